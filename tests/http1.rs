//! The lean HTTP/1.1 loop that serves publish and LongPoll connections (src/http1.rs):
//! keep-alive, pipelining, handing a connection to hyper mid-stream, and heads that are slow,
//! broken, or simply not its kind.

mod support;

use futures_util::StreamExt;
use serde_json::Value;
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One client connection that reads responses one at a time, keeping what arrives early.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        body_json(&self.body)
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

impl Conn {
    async fn open(addr: std::net::SocketAddr) -> Conn {
        Conn {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    /// The next response (Content-Length bodies only, which is all pushgate sends here).
    async fn answer(&mut self) -> Answer {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(split) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..split]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())
                            .flatten()
                    })
                    .unwrap_or(0);
                if self.buf.len() >= split + 4 + len {
                    let body = self.buf[split + 4..split + 4 + len].to_vec();
                    self.buf.drain(..split + 4 + len);
                    let status = head[9..12].parse().unwrap();
                    return Answer { status, head, body };
                }
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout_at(deadline, self.s.read(&mut chunk))
                .await
                .expect("response timed out")
                .unwrap();
            assert!(
                n > 0,
                "closed before a whole response: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Waits for the server to close the connection (EOF or reset), with nothing more sent.
    async fn closed(&mut self) {
        let mut chunk = [0u8; 1024];
        loop {
            match tokio::time::timeout(DEADLINE, self.s.read(&mut chunk))
                .await
                .expect("the server did not close the connection")
            {
                Ok(0) | Err(_) => return,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

fn publish_request(topic: &str, seq: u64, extra_headers: &str) -> Vec<u8> {
    let body = format!(r#"{{"topic":"{topic}","event":"m","payload":{{"seq":{seq}}}}}"#);
    format!(
        "POST /api/publish HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn offset(answer: &Answer) -> u64 {
    let v = answer.json();
    let pos = v["position"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_string();
    split_position(&pos).1
}

#[tokio::test]
async fn publishes_share_a_keep_alive_connection_and_hyper_takes_over_for_other_paths() {
    install_panic_counter();
    let s = start().await;
    let mut c = Conn::open(s.addr).await;
    for seq in 1..=3 {
        c.send(&publish_request("lean:ka", seq, "")).await;
        let a = c.answer().await;
        assert_eq!(a.status, 200, "{}", a.head);
        assert_eq!(offset(&a), seq);
        assert_eq!(
            a.header("content-type").as_deref(),
            Some("application/json")
        );
        assert!(a.header("date").is_some(), "{}", a.head);
        assert_eq!(a.header("connection"), None, "{}", a.head);
    }
    // Not a lean request: hyper serves the same connection from here on.
    c.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let a = c.answer().await;
    assert_eq!(
        (a.status, a.json()),
        (200, serde_json::json!({"status": "ok"}))
    );
    c.send(&publish_request("lean:ka", 4, "")).await;
    let a = c.answer().await;
    assert_eq!((a.status, offset(&a)), (200, 4));
    // `Connection: close` is honoured.
    let mut c = Conn::open(s.addr).await;
    c.send(&publish_request("lean:ka", 5, "Connection: close\r\n"))
        .await;
    let a = c.answer().await;
    assert_eq!((a.status, offset(&a)), (200, 5));
    assert_eq!(a.header("connection").as_deref(), Some("close"));
    c.closed().await;
    assert_eq!(server_panics(), 0);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    install_panic_counter();
    let s = start().await;
    let mut c = Conn::open(s.addr).await;
    let mut all = Vec::new();
    for seq in 1..=5 {
        all.extend(publish_request("lean:pipe", seq, ""));
    }
    all.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    all.extend(publish_request("lean:pipe", 6, ""));
    // Split in odd places, so heads and bodies straddle reads.
    for part in all.chunks(37) {
        c.send(part).await;
    }
    for seq in 1..=5 {
        let a = c.answer().await;
        assert_eq!((a.status, offset(&a)), (200, seq));
    }
    let a = c.answer().await;
    assert_eq!(a.json()["status"], "ok");
    let a = c.answer().await;
    assert_eq!((a.status, offset(&a)), (200, 6));
    assert_eq!(server_panics(), 0);
}

#[tokio::test]
async fn refused_publishes_are_answered_and_the_connection_closed() {
    install_panic_counter();
    let mut config = test_config();
    config.publish.max_body_bytes = 1024;
    let s = start_with(config).await;

    // Wrong token: 401 with the scheme, then close (the body was not read).
    let mut c = Conn::open(s.addr).await;
    let body = r#"{"topic":"t","event":"m","payload":{}}"#;
    c.send(
        format!(
            "POST /api/publish HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer wrong-token-0000000\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let a = c.answer().await;
    assert_eq!(a.status, 401);
    assert_eq!(a.header("www-authenticate").as_deref(), Some("Bearer"));
    assert!(a.json()["error"].is_string(), "{}", a.json());
    c.closed().await;

    // Declared too large: 413 before the body is read, then close.
    let mut c = Conn::open(s.addr).await;
    c.send(
        format!(
            "POST /api/publish HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Length: 5000\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let a = c.answer().await;
    assert_eq!(a.status, 413);
    assert!(
        a.json()["error"]
            .as_str()
            .unwrap()
            .contains("publish.max_body_bytes")
    );
    c.closed().await;

    // A bad body on a keep-alive connection: 400, and the connection goes on.
    let mut c = Conn::open(s.addr).await;
    c.send(
        format!(
            "POST /api/publish HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Length: 3\r\n\r\n{{x}}"
        )
        .as_bytes(),
    )
    .await;
    let a = c.answer().await;
    assert_eq!(a.status, 400);
    c.send(&publish_request("lean:refused", 1, "")).await;
    assert_eq!(c.answer().await.status, 200);
    assert_eq!(server_panics(), 0);
}

#[tokio::test]
async fn broken_slow_and_unusual_heads_are_handled() {
    install_panic_counter();
    let mut config = test_config();
    config.server.header_read_timeout_ms = 300;
    let s = start_with(config).await;

    // A malformed header line after a lean request line: hyper answers 400.
    let mut c = Conn::open(s.addr).await;
    c.send(b"POST /api/publish HTTP/1.1\r\nHost: t\r\nthis is not a header\r\n\r\n")
        .await;
    assert_eq!(c.answer().await.status, 400);

    // HTTP/1.0 and chunked bodies go to hyper, which publishes them.
    let body = r#"{"topic":"lean:unusual","event":"m","payload":{}}"#;
    let mut c = Conn::open(s.addr).await;
    c.send(
        format!(
            "POST /api/publish HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let a = c.answer().await;
    assert_eq!((a.status, offset(&a)), (200, 1));
    let mut c = Conn::open(s.addr).await;
    c.send(
        format!(
            "POST /api/publish HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let a = c.answer().await;
    assert_eq!((a.status, offset(&a)), (200, 2));

    // Two different Content-Length headers: refused (by hyper), never guessed at.
    let mut c = Conn::open(s.addr).await;
    c.send(
        format!(
            "POST /api/publish HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Length: {}\r\nContent-Length: 3\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(c.answer().await.status, 400);

    // A head that stops half way is answered 408 and closed after
    // `server.header_read_timeout_ms` (tests/deadlines.rs times it).
    let mut c = Conn::open(s.addr).await;
    c.send(b"POST /api/publish HTTP/1.1\r\nHost: t\r\n").await;
    c.closed().await;
    let text = String::from_utf8_lossy(&c.buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");

    // The node is fine.
    let mut c = Conn::open(s.addr).await;
    c.send(&publish_request("lean:unusual", 3, "")).await;
    let a = c.answer().await;
    assert_eq!((a.status, offset(&a)), (200, 3));
    assert_eq!(server_panics(), 0);
}

#[tokio::test]
async fn a_longpoll_connection_can_carry_a_websocket_afterwards() {
    install_panic_counter();
    let s = start().await;
    let mut c = Conn::open(s.addr).await;
    c.send(b"GET /socket/longpoll?vsn=2.0.0 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    let a = c.answer().await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["status"], 410, "{}", a.json());
    assert_eq!(
        a.header("access-control-allow-origin").as_deref(),
        Some("*")
    );
    assert_eq!(a.header("cache-control").as_deref(), Some("no-store"));
    // The same connection upgrades (hyper takes over, bytes already read included).
    c.send(
        b"GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    let a = c.answer().await;
    assert_eq!(a.status, 101, "{}", a.head);
    assert!(c.buf.is_empty());
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        tokio_tungstenite::MaybeTlsStream::Plain(c.s),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    let reply = join(&mut ws, "1", "lean:ws", "{}").await;
    assert!(reply["position"].is_string(), "{reply}");
    publish(s.addr, "lean:ws", "m", r#"{"n":1}"#).await;
    let msg = recv(&mut ws).await;
    assert_eq!(msg[4]["n"], 1, "{msg}");
    ws.close(None).await.ok();
    let _ = ws.next().await;
    assert_eq!(server_panics(), 0);
}

#[tokio::test]
async fn a_held_poll_whose_client_leaves_lets_the_session_expire() {
    install_panic_counter();
    // The window outlasts the test's deadline: only noticing the client leave lets the
    // session expire in time.
    let mut config = test_config();
    config.longpoll.window_ms = 5_000;
    config.longpoll.session_timeout_ms = 6_000;
    let s = start_with(config).await;
    let mut c = Conn::open(s.addr).await;
    c.send(b"GET /socket/longpoll?vsn=2.0.0 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    let token = c.answer().await.json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    // A poll is held (nothing to answer), then the client goes away.
    c.send(
        format!("GET /socket/longpoll?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: t\r\n\r\n")
            .as_bytes(),
    )
    .await;
    wait_until(|| s.app.longpoll.len() == 1).await;
    tokio::time::timeout(Duration::from_millis(50), c.s.read(&mut [0u8; 16]))
        .await
        .expect_err("the poll is held");
    drop(c);
    // With no poll pending any more, the session expires.
    wait_until(|| s.app.longpoll.is_empty()).await;
    assert_eq!(server_panics(), 0);
}

#[tokio::test]
async fn a_stalled_body_does_not_hold_up_a_shutdown() {
    install_panic_counter();
    let s = start().await;
    let mut c = Conn::open(s.addr).await;
    // A whole head and part of its body; the rest never comes.
    c.send(
        format!(
            "POST /api/publish HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Length: 100\r\n\r\n{{\"topic\":"
        )
        .as_bytes(),
    )
    .await;
    // A publish on another connection, answered after the server (this test's own runtime)
    // has taken in the bytes above: the first connection is then waiting for the rest.
    let mut other = Conn::open(s.addr).await;
    other.send(&publish_request("lean:stall", 1, "")).await;
    assert_eq!(other.answer().await.status, 200);
    s.stop.cancel();
    // Every task ends within the grace period (`run` returns true).
    assert!(s.handle.await.unwrap(), "a task outlived the grace period");
    c.closed().await;
    assert_eq!(server_panics(), 0);
}

/// A publisher on a keep-alive connection that looks idle when the node starts shutting down
/// (`systemctl restart`) may be sending its next request at that very moment: the connection
/// stays open for `shutdown.drain_ms`, and that request is answered, with `Connection: close`,
/// instead of being cut off (the publisher could not tell whether it was published).
#[tokio::test]
async fn a_keep_alive_connection_idle_at_shutdown_still_gets_its_next_request_answered() {
    install_panic_counter();
    let mut config = test_config();
    config.shutdown.drain_ms = 2000;
    let s = start_with(config).await;
    let mut c = Conn::open(s.addr).await;
    c.send(&publish_request("lean:idle-at-shutdown", 1, ""))
        .await;
    let first = c.answer().await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("connection"), None);
    s.stop.cancel();
    wait_until(|| s.app.is_draining()).await;
    // Not closed as the shutdown begins (a negative check: nothing may arrive in this window).
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), c.s.peek(&mut byte)).await;
    assert!(
        early.is_err(),
        "the idle connection was closed at shutdown: {early:?}"
    );
    c.send(&publish_request("lean:idle-at-shutdown", 2, ""))
        .await;
    let second = c.answer().await;
    assert_eq!(second.status, 200, "{}", second.head);
    assert_eq!(offset(&second), offset(&first) + 1);
    assert_eq!(second.header("connection").as_deref(), Some("close"));
    c.closed().await;
    assert!(s.handle.await.unwrap(), "a task outlived the grace period");
    assert_eq!(server_panics(), 0);
}
