//! Shared helpers for integration tests: a real server on 127.0.0.1:0, a WebSocket client
//! (tokio-tungstenite, an independent implementation), and a minimal HTTP client.
#![allow(dead_code)]

use futures_util::{SinkExt, StreamExt};
use pushgate::{App, Config};
use std::net::SocketAddr;
use std::path::Path;
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

/// [`test_config`] for a test where one address plays many clients (hundreds of connections
/// from 127.0.0.1 in a moment): the per-address limits (`tests/admission.rs`) are off.
pub fn many_clients_config() -> Config {
    let mut c = test_config();
    c.limits.max_connections_per_address = 0;
    c.limits.connect_rate_per_address = 0;
    c
}

/// A throwaway CA and a certificate it signed for `names` (DNS names or IP addresses), for a
/// test's TLS server (Pebble's HTTPS, an HTTPS app).
pub struct TestCa {
    pub ca_pem: String,
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    pub key_pem: String,
    pub key_der: Vec<u8>,
}

impl TestCa {
    pub fn new(names: &[&str]) -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.distinguished_name
            .push(DnType::CommonName, "pushgate test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut leaf =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        leaf.distinguished_name.push(DnType::CommonName, names[0]);
        let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
        TestCa {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }
}

pub async fn start() -> TestServer {
    start_with(test_config()).await
}

/// The runtime the server of [`start_with`] runs on: the test's own (tokio's current-thread
/// test runtime), or with `PUSHGATE_TEST_RUNTIME=multi_thread` a shared multi-threaded runtime
/// of 2 workers, like the binary's, so that the hub and the transports meet cross-thread races
/// (scripts/test.sh runs the hub and transport tests both ways).
fn server_runtime() -> Option<&'static tokio::runtime::Runtime> {
    static RT: std::sync::OnceLock<Option<tokio::runtime::Runtime>> = std::sync::OnceLock::new();
    RT.get_or_init(|| match std::env::var("PUSHGATE_TEST_RUNTIME").as_deref() {
        Ok("multi_thread") => Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a multi-threaded runtime"),
        ),
        Ok("current_thread") | Err(_) => None,
        Ok(other) => panic!("PUSHGATE_TEST_RUNTIME={other}: multi_thread or current_thread"),
    })
    .as_ref()
}

pub async fn start_with(config: Config) -> TestServer {
    config.validate().expect("test config must be valid");
    start_unvalidated(config).await
}

/// [`start_with`] without `Config::validate`, for a test that needs a value production may not
/// use (a timeout shorter than the minimum a real client needs).
pub async fn start_unvalidated(config: Config) -> TestServer {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let app = App::new(config, CancellationToken::new());
    let s = stop.clone();
    let served = app.clone();
    // The listener is registered with the runtime that serves it.
    let serve = async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        pushgate::run_app(vec![listener], served, async move { s.cancelled().await }).await
    };
    let handle = match server_runtime() {
        Some(rt) => {
            // Stopped when the test's runtime ends (its tasks are dropped), as a server
            // spawned on it would be.
            let guard = stop.clone().drop_guard();
            tokio::spawn(async move {
                let _guard = guard;
                std::future::pending::<()>().await
            });
            rt.spawn(serve)
        }
        None => tokio::spawn(serve),
    };
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
    let reply = join_reply(ws, join_ref, topic, params).await;
    assert_eq!(reply["status"], "ok", "join reply {reply}");
    reply["response"].clone()
}

/// Sends a join and returns its reply's payload (`{"status", "response"}`), whatever the status.
pub async fn join_reply(
    ws: &mut Ws,
    join_ref: &str,
    topic: &str,
    params: &str,
) -> serde_json::Value {
    send(
        ws,
        &format!(r#"["{join_ref}","{join_ref}","{topic}","phx_join",{params}]"#),
    )
    .await;
    let reply = recv(ws).await;
    assert_eq!(reply[0], join_ref, "join reply {reply}");
    assert_eq!(reply[1], join_ref);
    assert_eq!(reply[2], topic, "join reply {reply}");
    assert_eq!(reply[3], "phx_reply");
    reply[4].clone()
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

// ---------------------------------------------------------------------------------------------
// Helpers added for bad_input.rs, publish.rs and cli.rs. They only add to the ones above.
// ---------------------------------------------------------------------------------------------

/// Reads one HTTP/1.1 response from `s`: headers, then a `Content-Length` body (or everything
/// up to EOF without one). A reset after the whole response arrived is not an error: a server
/// that answers before reading the request body may reset the connection when it closes it.
pub async fn read_response(s: &mut TcpStream) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let complete = |buf: &[u8]| -> Option<(usize, Option<usize>)> {
        let split = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&buf[..split]).to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        Some((split, len))
    };
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some((split, Some(len))) = complete(&buf)
            && buf.len() >= split + 4 + len
        {
            break;
        }
        let n = match tokio::time::timeout_at(end, s.read(&mut chunk)).await {
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "http response timed out",
                ));
            }
            Ok(Ok(n)) => n,
            // Reset after the headers: keep what arrived; the length check below decides.
            Ok(Err(_)) if complete(&buf).is_some() => 0,
            Ok(Err(e)) => return Err(e),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let Some((split, len)) = complete(&buf) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "connection closed before the response headers: {:?}",
                String::from_utf8_lossy(&buf)
            ),
        ));
    };
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    let mut body = buf[split + 4..].to_vec();
    if let Some(len) = len {
        if body.len() < len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "response body cut short",
            ));
        }
        body.truncate(len);
    }
    Ok((status, head, body))
}

/// Like [`http`], but returns connection errors (refused, reset) instead of panicking, and
/// tolerates a reset that follows a complete response.
pub async fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    )
    .into_bytes();
    for (k, v) in headers {
        req.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    raw_http(addr, &req).await
}

/// Sends `request` (a whole HTTP/1.1 request, as bytes) and reads the response. A write that
/// fails because the server already answered and closed is ignored: the response decides.
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut s = tokio::time::timeout(DEADLINE, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = s.write_all(request).await;
    read_response(&mut s).await
}

/// The value of response header in `head` (status line and headers) `name` (case-insensitive), if present.
pub fn header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// The body as JSON, or a JSON string holding the text when it is not JSON.
pub fn body_json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(body).into_owned()))
}

/// `POST /api/publish` with `authorization` (the whole header value, if any) and `body`;
/// returns (status, headers, body as JSON).
pub async fn post_publish(
    addr: SocketAddr,
    authorization: Option<&str>,
    body: &[u8],
) -> (u16, String, serde_json::Value) {
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = authorization {
        headers.push(("Authorization", a));
    }
    let (status, head, body) = try_http(addr, "POST", "/api/publish", &headers, body)
        .await
        .expect("publish request failed");
    (status, head, body_json(&body))
}

/// The value of one sample in `/metrics`, e.g. `metric(addr, "pushgate_joins_total")` or
/// `metric(addr, r#"pushgate_connections{transport="websocket"}"#)`.
pub async fn metric(addr: SocketAddr, sample: &str) -> Option<f64> {
    let (status, _, body) = http(addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).expect("metrics are UTF-8");
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The sum of every sample of a metric family in `/metrics` (whatever its labels), or `None`
/// when the family has no samples.
pub async fn metric_sum(addr: SocketAddr, family: &str) -> Option<f64> {
    let (status, _, body) = http(addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).expect("metrics are UTF-8");
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(family)?;
            let value = if rest.starts_with('{') {
                rest.split_once("} ")?.1
            } else {
                rest.strip_prefix(' ')?
            };
            value.trim().parse().ok()
        })
        .collect();
    if values.is_empty() {
        None
    } else {
        Some(values.iter().sum())
    }
}

/// Splits a position `"<epoch>:<offset>"`.
pub fn split_position(p: &str) -> (String, u64) {
    let (epoch, offset) = p.rsplit_once(':').expect("position is <epoch>:<offset>");
    assert!(!epoch.is_empty(), "empty epoch in {p}");
    (epoch.to_string(), offset.parse().expect("numeric offset"))
}

/// Reads after the server's close frame until the stream ends, so that tungstenite sends its
/// close reply; returns the server's close code.
pub async fn recv_close_then_end(ws: &mut Ws) -> u16 {
    let code = recv_close(ws).await;
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(end, ws.next()).await {
            Err(_) => panic!("the connection stayed open after the close frame"),
            Ok(None) | Ok(Some(Err(_))) => break,
            Ok(Some(Ok(_))) => continue,
        }
    }
    code
}

/// Counts panics whose location is outside `tests/`, i.e. in the server (the in-process server
/// runs on the test's runtime, so its task panics are otherwise swallowed by tokio).
/// Call `install_panic_counter()` at the start of a test, and check `server_panics()` at its end.
static SERVER_PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub fn install_panic_counter() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_tests = info
                .location()
                .is_some_and(|l| l.file().starts_with("tests/") || l.file().contains("/tests/"));
            if !in_tests {
                SERVER_PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            default(info);
        }));
    });
}

pub fn server_panics() -> usize {
    SERVER_PANICS.load(std::sync::atomic::Ordering::SeqCst)
}

/// A client WebSocket frame. Client frames must be masked; `masked: false` breaks that rule.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let m = if masked { 0x80 } else { 0 };
    if payload.len() < 126 {
        out.push(m | payload.len() as u8);
    } else if payload.len() <= u16::MAX as usize {
        out.push(m | 126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    }
    if masked {
        let mask = [0x5a, 0x13, 0xc7, 0x81];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

#[allow(unused_imports)] // each test binary uses some of them
pub use pushgate::ws::{OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT};

/// A WebSocket client on a plain TcpStream, with the handshake done by hand, for sending
/// frames no well-behaved client library would send.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// What the server sent: a frame, or the end of the TCP stream.
#[derive(Debug, PartialEq, Eq)]
pub enum RawEvent {
    Frame {
        fin: bool,
        opcode: u8,
        payload: Vec<u8>,
    },
    Eof,
}

pub async fn raw_connect(addr: SocketAddr) -> RawWs {
    let mut stream = tokio::time::timeout(DEADLINE, TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect failed");
    let req = format!(
        "GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let split = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut chunk))
            .await
            .expect("handshake timed out")
            .expect("handshake read failed");
        assert!(n > 0, "connection closed during the handshake");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "handshake refused: {head}"
    );
    // RFC 6455 §1.3's example key and its accept value.
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "wrong accept key: {head}"
    );
    buf.drain(..split + 4);
    RawWs { stream, buf }
}

impl RawWs {
    /// Writes bytes as they are. Errors are returned: the server may have closed already.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Sends one masked frame.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.send_bytes(&client_frame(fin, opcode, payload, true))
            .await
            .expect("write failed");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(true, OP_TEXT, text.as_bytes()).await;
    }

    /// The next frame from the server, or `Eof` when the connection ends (a reset counts).
    pub async fn next_event(&mut self) -> RawEvent {
        let end = tokio::time::Instant::now() + DEADLINE;
        let mut chunk = [0u8; 8192];
        loop {
            if let Some((fin, opcode, payload, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return RawEvent::Frame {
                    fin,
                    opcode,
                    payload,
                };
            }
            let n = match tokio::time::timeout_at(end, self.stream.read(&mut chunk)).await {
                Err(_) => panic!("no frame from the server before the deadline"),
                Ok(Ok(n)) => n,
                Ok(Err(_)) => 0,
            };
            if n == 0 {
                assert!(
                    self.buf.is_empty(),
                    "connection ended inside a frame: {:?}",
                    self.buf
                );
                return RawEvent::Eof;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next text frame as JSON (pings and pongs are skipped); panics on anything else.
    pub async fn recv_json(&mut self) -> serde_json::Value {
        loop {
            match self.next_event().await {
                RawEvent::Frame {
                    fin: true,
                    opcode: OP_TEXT,
                    payload,
                } => return serde_json::from_slice(&payload).expect("server text is JSON"),
                RawEvent::Frame {
                    opcode: OP_PING | OP_PONG,
                    ..
                } => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Reads up to the server's close frame and returns its code (1005 when it has none).
    /// Panics if the connection ends without a close frame or a text frame comes first.
    pub async fn recv_close(&mut self) -> u16 {
        loop {
            match self.next_event().await {
                RawEvent::Frame {
                    opcode: OP_CLOSE,
                    payload,
                    ..
                } => {
                    if payload.len() < 2 {
                        return 1005;
                    }
                    return u16::from_be_bytes([payload[0], payload[1]]);
                }
                RawEvent::Frame {
                    opcode: OP_PING | OP_PONG,
                    ..
                } => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// After a close frame: the server must end the TCP connection (no frames follow).
    pub async fn expect_eof(&mut self) {
        assert_eq!(self.next_event().await, RawEvent::Eof);
    }
}

/// Parses one unmasked server frame; `None` if `buf` does not hold a whole one yet.
fn parse_server_frame(buf: &[u8]) -> Option<(bool, u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames must not be masked");
    let (len, at) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        n => (n as usize, 2),
    };
    if buf.len() < at + len {
        return None;
    }
    Some((
        buf[0] & 0x80 != 0,
        buf[0] & 0x0f,
        buf[at..at + len].to_vec(),
        at + len,
    ))
}

pub mod ports;
#[allow(unused_imports)] // each test binary uses some of them
pub use ports::{free_port, free_port_v4_v6};

/// Spawns the process `command(port)` builds, on a free port, until it listens on that port
/// itself: one that exits first lost the port to another process between the pick and the bind,
/// and starts again on a fresh one ([`ports::retry_taken_ports`]); one that neither listens nor
/// exits within [`DEADLINE`] fails the test. Returns the child and its port.
pub fn spawn_on_free_port(
    what: &str,
    mut command: impl FnMut(u16) -> std::process::Command,
) -> (std::process::Child, u16) {
    ports::retry_taken_ports(what, |_| {
        let port = free_port();
        let mut child = command(port)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        match ports::wait_listening(&mut child, &[port], DEADLINE, what) {
            Ok(()) => Ok((child, port)),
            Err(taken) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(taken)
            }
        }
    })
}

/// A real `redis-server` on a free port, stopped on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
    /// Extra arguments (persistence, replication), given again on every restart.
    args: Vec<String>,
    /// The data directory of a persistent server (removed on drop).
    dir: Option<std::path::PathBuf>,
}

impl RedisServer {
    /// Starts on a free port; if another process takes the port between the pick and the
    /// bind (redis-server then exits at once), on another one.
    pub fn start() -> RedisServer {
        Self::start_with(&["--save", "", "--appendonly", "no"], false)
    }

    /// [`RedisServer::start`], trying `port` first.
    pub fn start_from(port: u16) -> RedisServer {
        Self::start_at(port, &["--save", "", "--appendonly", "no"], false)
    }

    /// A server with RDB persistence in its own directory, but no automatic snapshot: the
    /// test takes them (`SAVE`), so what a restart brings back is exactly the last snapshot.
    /// A SIGKILL ([`RedisServer::stop`]) then [`RedisServer::restart`] loses every write since.
    pub fn start_rdb() -> RedisServer {
        Self::start_with(&["--save", "", "--appendonly", "no"], true)
    }

    /// A server with these arguments; `persistent` gives it a data directory of its own
    /// (kept across restarts, removed on drop).
    pub fn start_with(args: &[&str], persistent: bool) -> RedisServer {
        Self::start_at(free_port(), args, persistent)
    }

    fn start_at(port: u16, args: &[&str], persistent: bool) -> RedisServer {
        let mut r = RedisServer {
            port,
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
            dir: None,
        };
        ports::retry_taken_ports("redis-server", |attempt| {
            if attempt > 0 {
                r.port = free_port();
            }
            r.dir = persistent.then(|| {
                let d = std::env::temp_dir().join(format!(
                    "pushgate-test-redis-{}-{}-{:08x}",
                    std::process::id(),
                    r.port,
                    rand::random::<u32>()
                ));
                std::fs::create_dir_all(&d).unwrap();
                d
            });
            if r.spawn() {
                return Ok(());
            }
            if let Some(d) = r.dir.take() {
                let _ = std::fs::remove_dir_all(d);
            }
            Err(ports::PortTaken(format!(
                "redis-server exited or another process answered on {}",
                r.port
            )))
        });
        r
    }

    /// Starts redis-server on `self.port` and waits until it answers; false when it exited
    /// without answering (the port was taken).
    fn spawn(&mut self) -> bool {
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(&self.args);
        if let Some(d) = &self.dir {
            cmd.arg("--dir").arg(d);
        }
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let end = std::time::Instant::now() + DEADLINE;
        loop {
            // Exited (the port was taken) before answering?
            let exited = self.child.as_mut().map(|c| c.try_wait());
            if let Some(Ok(Some(_))) = exited {
                self.child = None;
                return false;
            }
            if self.cli(&["ping"]).trim() == "PONG" {
                break;
            }
            assert!(
                std::time::Instant::now() < end,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // The answer may have come from another server on that port: ours must be the one.
        let pid = self.child.as_ref().map(|c| c.id().to_string());
        let info = self.cli(&["INFO", "server"]);
        let ours = info
            .lines()
            .find_map(|l| l.trim().strip_prefix("process_id:"))
            .map(str::to_string);
        if ours != pid {
            self.stop();
            return false;
        }
        true
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Runs `redis-cli` against this server; returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        // Bounded (coreutils `timeout`): a port held by something that accepts and never
        // answers, or a paused server, must not hang the test.
        let out = std::process::Command::new("timeout")
            .args(["5", "redis-cli", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = std::process::Command::new("kill")
                .arg(sig)
                .arg(c.id().to_string())
                .status();
        }
    }

    /// Stops (SIGKILL) and starts again on the same port: without persistence the data is
    /// gone; with it, Redis comes back with what its files hold. The port is below the
    /// ephemeral range and handed out once per test process, so no outgoing connection can
    /// take it meanwhile; if another process's listener did, this says so.
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.spawn(),
            "port {} was taken while redis-server was down",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

pub fn redis_config(url: &str) -> Config {
    let mut c = test_config();
    c.redis.url = url.to_string();
    c
}

/// Waits until `/readyz` answers `status`.
pub async fn wait_ready(addr: SocketAddr, status: u16) {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        if http(addr, "GET", "/readyz", &[], b"").await.0 == status {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "/readyz never answered {status}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// With `TEST_LOG` set, the servers' debug logs go to the test's output.
pub fn log() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("pushgate=debug")
            .with_test_writer()
            .try_init();
    }
}

/// Polls `/readyz` of a node that must never get ready (`why` says what would be wrong if it
/// did) until its 503 reason says it cannot connect to Redis.
pub async fn readyz_reports_cannot_connect(addr: SocketAddr, why: &str) {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, _, body) = http(addr, "GET", "/readyz", &[], b"").await;
        assert_eq!(status, 503, "{why}");
        if String::from_utf8_lossy(&body).contains("cannot connect") {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "no connect failure reported"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Debian's nginx modules.
pub const NGINX_MODULES: &str = "/usr/lib/nginx/modules";

/// An nginx.conf for a test's nginx under `prefix` (one worker, logs and temp files in the
/// prefix), Debian-like: the brotli modules loaded, `main_context` (more modules, a stream
/// block's include) at main level, and the site in `conf/pushgate.conf` inside `http {}`.
pub fn nginx_main_conf(prefix: &Path, main_context: &str) -> String {
    let p = prefix.display();
    format!(
        r#"load_module {NGINX_MODULES}/ngx_http_brotli_filter_module.so;
load_module {NGINX_MODULES}/ngx_http_brotli_static_module.so;
{main_context}
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/logs/error.log info;
events {{ worker_connections 1024; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log {p}/logs/access.log;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    include {p}/conf/pushgate.conf;
}}
"#
    )
}

/// A fresh directory for one test (`pushgate-<suite>-<name>-<pid>` in the temporary directory),
/// readable by all (nginx workers run as nobody when the tests run as root), removed when the
/// test passes and kept for a look when it fails.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(suite: &str, name: &str) -> TempDir {
        use std::os::unix::fs::PermissionsExt;
        let p =
            std::env::temp_dir().join(format!("pushgate-{suite}-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(p)
    }

    pub fn path(&self, rel: &str) -> std::path::PathBuf {
        self.0.join(rel)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
