//! Shared helpers for integration tests: a real server on 127.0.0.1:0, a WebSocket client
//! (tokio-tungstenite, an independent implementation), and a minimal HTTP client.
#![allow(dead_code)]

use futures_util::{SinkExt, StreamExt};
use pushgate::{App, Config};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "test-token-0123456789";
pub const DEADLINE: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    pub stop: CancellationToken,
    pub handle: JoinHandle<bool>,
}

pub fn test_config() -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".into();
    c.publish.token = TOKEN.into();
    c.shutdown.drain_ms = 50;
    c.shutdown.grace_ms = 3000;
    c
}

pub async fn start() -> TestServer {
    start_with(test_config()).await
}

pub async fn start_with(config: Config) -> TestServer {
    config.validate().expect("test config must be valid");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let app = App::new(config, CancellationToken::new());
    let s = stop.clone();
    let handle = tokio::spawn(pushgate::run_app(vec![listener], app.clone(), async move {
        s.cancelled().await
    }));
    TestServer {
        addr,
        app,
        stop,
        handle,
    }
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

pub async fn connect(addr: SocketAddr) -> Ws {
    let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0");
    let (ws, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect timed out")
        .expect("connect failed");
    ws
}

pub async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
}

/// The next text frame as JSON; panics on timeout or on a close.
pub async fn recv(ws: &mut Ws) -> serde_json::Value {
    loop {
        let m = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("no frame before the deadline")
            .expect("stream ended")
            .expect("websocket error");
        match m {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Reads until the server's close frame; returns its code. Panics if a text frame comes first
/// and `skip_text` is false.
pub async fn recv_close(ws: &mut Ws) -> u16 {
    loop {
        let m = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("no close before the deadline");
        match m {
            Some(Ok(Message::Close(Some(f)))) => return f.code.into(),
            Some(Ok(Message::Close(None))) => return 1005,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("websocket error before close: {e}"),
            None => panic!("stream ended without a close frame"),
        }
    }
}

/// Joins `topic` with `params`; returns the reply's `response` after checking status ok.
pub async fn join(ws: &mut Ws, join_ref: &str, topic: &str, params: &str) -> serde_json::Value {
    send(
        ws,
        &format!(r#"["{join_ref}","{join_ref}","{topic}","phx_join",{params}]"#),
    )
    .await;
    let reply = recv(ws).await;
    assert_eq!(reply[0], join_ref, "join reply {reply}");
    assert_eq!(reply[1], join_ref);
    assert_eq!(reply[3], "phx_reply");
    assert_eq!(reply[4]["status"], "ok", "join reply {reply}");
    reply[4]["response"].clone()
}

/// A plain HTTP/1.1 exchange with `Connection: close`: returns (status, headers, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf))
        .await
        .expect("http response timed out")
        .unwrap();
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no header end");
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head[9..12].parse().unwrap();
    (status, head, buf[split + 4..].to_vec())
}

/// Publishes through the API; returns the position.
pub async fn publish(addr: SocketAddr, topic: &str, event: &str, payload: &str) -> String {
    let body = format!(r#"{{"topic":"{topic}","event":"{event}","payload":{payload}}}"#);
    let auth = format!("Bearer {TOKEN}");
    let (status, _, body) = http(
        addr,
        "POST",
        "/api/publish",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["position"].as_str().unwrap().to_string()
}

/// Polls `f` until it returns true or the deadline passes.
pub async fn wait_until(mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + DEADLINE;
    while !f() {
        assert!(
            tokio::time::Instant::now() < end,
            "condition not met in time"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
