//! Per-client limits (issue 16, item 7): connections and LongPoll sessions per address, new
//! connections per address per second, joins per connection per second, and who the client is
//! (`X-Forwarded-For` only from `server.trusted_proxies`). Clients come from distinct loopback
//! addresses (127.0.0.x), as distinct hosts would; the assertion is always that a legitimate
//! client elsewhere still connects, joins and receives while one address is refused.

mod support;

use serde_json::Value;
use std::net::SocketAddr;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A TCP connection to `addr` from the loopback address `source`.
async fn tcp_from(addr: SocketAddr, source: &str) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    sock.connect(addr).await.unwrap()
}

/// A WebSocket handshake from `source`, with extra headers; the HTTP status of a refusal.
async fn ws_from(addr: SocketAddr, source: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
    let stream = tcp_from(addr, source).await;
    let mut req = format!("ws://{addr}/socket/websocket?vsn=2.0.0")
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        let name: tokio_tungstenite::tungstenite::http::HeaderName = k.parse().unwrap();
        req.headers_mut()
            .insert(name, v.parse().expect("header value"));
    }
    let r = tokio::time::timeout(
        DEADLINE,
        tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream)),
    )
    .await
    .expect("handshake timed out");
    match r {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

/// A first LongPoll GET from `source`: the answer's JSON (410 with a token for a new session).
async fn longpoll_from(addr: SocketAddr, source: &str, headers: &[(&str, &str)]) -> Value {
    let mut s = tcp_from(addr, source).await;
    let mut req =
        format!("GET /socket/longpoll?vsn=2.0.0 HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf))
        .await
        .expect("longpoll answer timed out")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "LongPoll answers HTTP 200: {head}"
    );
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

async fn refusals(addr: SocketAddr, cause: &str) -> f64 {
    metric(
        addr,
        &format!("pushgate_refusals_total{{cause=\"{cause}\"}}"),
    )
    .await
    .unwrap_or_else(|| panic!("no refusals metric for {cause}"))
}

/// A legitimate client from `source`: connects, joins a topic, and receives what is published.
async fn legitimate_client_works(addr: SocketAddr, source: &str, topic: &str) {
    let mut ws = ws_from(addr, source, &[])
        .await
        .unwrap_or_else(|s| panic!("the legitimate client from {source} was refused: {s}"));
    let t0 = std::time::Instant::now();
    join(&mut ws, "1", topic, "{}").await;
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(1),
        "join took {:?}",
        t0.elapsed()
    );
    publish(addr, topic, "hello", r#"{"n":1}"#).await;
    let m = recv(&mut ws).await;
    assert_eq!(m[3], "hello", "{m}");
}

fn config(edit: impl FnOnce(&mut pushgate::Config)) -> pushgate::Config {
    let mut c = test_config();
    edit(&mut c);
    c
}

#[tokio::test]
async fn an_address_past_its_connection_limit_gets_429_and_others_connect() {
    let s = start_with(config(|c| {
        c.limits.max_connections_per_address = 3;
        c.limits.connect_rate_per_address = 0;
    }))
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            ws_from(s.addr, "127.0.0.2", &[])
                .await
                .expect("within the limit"),
        );
    }
    assert_eq!(ws_from(s.addr, "127.0.0.2", &[]).await.err(), Some(429));
    assert_eq!(refusals(s.addr, "per_address").await, 1.0);
    legitimate_client_works(s.addr, "127.0.0.3", "room:a").await;
    // A connection that ends gives its place back.
    drop(held.pop());
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        match ws_from(s.addr, "127.0.0.2", &[]).await {
            Ok(_) => break,
            Err(429) if tokio::time::Instant::now() < end => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            Err(e) => panic!("the freed place was not given back: {e}"),
        }
    }
}

#[tokio::test]
async fn longpoll_sessions_count_with_websockets_per_address() {
    let s = start_with(config(|c| {
        c.limits.max_connections_per_address = 2;
        c.limits.connect_rate_per_address = 0;
    }))
    .await;
    let _ws = ws_from(s.addr, "127.0.0.4", &[]).await.expect("first");
    let first = longpoll_from(s.addr, "127.0.0.4", &[]).await;
    assert_eq!(first["status"], 410, "{first}");
    // The third from that address: a status phoenix.js retries with backoff, no session made.
    let refused = longpoll_from(s.addr, "127.0.0.4", &[]).await;
    assert_eq!(refused["status"], 500, "{refused}");
    assert!(refused.get("token").is_none(), "{refused}");
    assert_eq!(
        metric(s.addr, r#"pushgate_connections{transport="longpoll"}"#).await,
        Some(1.0)
    );
    assert_eq!(ws_from(s.addr, "127.0.0.4", &[]).await.err(), Some(429));
    assert_eq!(refusals(s.addr, "per_address").await, 2.0);
    assert_eq!(longpoll_from(s.addr, "127.0.0.5", &[]).await["status"], 410);
    legitimate_client_works(s.addr, "127.0.0.5", "room:b").await;
}

#[tokio::test]
async fn new_connections_per_address_are_rate_limited() {
    let s = start_with(config(|c| {
        c.limits.max_connections_per_address = 0;
        c.limits.connect_rate_per_address = 1;
        c.limits.connect_burst_per_address = 3;
    }))
    .await;
    for _ in 0..3 {
        // Opened and closed: the rate counts openings, not what is held.
        ws_from(s.addr, "127.0.0.6", &[])
            .await
            .expect("within the burst");
    }
    assert_eq!(ws_from(s.addr, "127.0.0.6", &[]).await.err(), Some(429));
    assert_eq!(longpoll_from(s.addr, "127.0.0.6", &[]).await["status"], 500);
    assert_eq!(refusals(s.addr, "rate_limit").await, 2.0);
    legitimate_client_works(s.addr, "127.0.0.7", "room:c").await;
}

#[tokio::test]
async fn forwarded_for_names_the_client_only_behind_a_trusted_proxy() {
    let s = start_with(config(|c| {
        c.limits.max_connections_per_address = 1;
        c.limits.connect_rate_per_address = 0;
        c.server.trusted_proxies = vec!["127.0.0.1".into()];
    }))
    .await;
    // Through the proxy (127.0.0.1): each forwarded address has its own count, and what a
    // client wrote left of the proxy's entry is not believed.
    let xff = |v: &'static str| [("X-Forwarded-For", v)];
    let _a = ws_from(s.addr, "127.0.0.1", &xff("198.51.100.1"))
        .await
        .expect("a");
    assert_eq!(
        ws_from(s.addr, "127.0.0.1", &xff("198.51.100.7, 198.51.100.1"))
            .await
            .err(),
        Some(429)
    );
    let _b = ws_from(s.addr, "127.0.0.1", &xff("198.51.100.2"))
        .await
        .expect("b");
    let lp = longpoll_from(s.addr, "127.0.0.1", &xff("198.51.100.3")).await;
    assert_eq!(lp["status"], 410, "{lp}");
    assert_eq!(
        longpoll_from(s.addr, "127.0.0.1", &xff("198.51.100.3")).await["status"],
        500
    );
    // From an untrusted peer the header is ignored: the peer is the client.
    let _c = ws_from(s.addr, "127.0.0.8", &xff("198.51.100.4"))
        .await
        .expect("c");
    assert_eq!(
        ws_from(s.addr, "127.0.0.8", &xff("198.51.100.5"))
            .await
            .err(),
        Some(429)
    );
}

#[tokio::test]
async fn joins_past_the_rate_get_an_error_reply_and_the_connection_lives_on() {
    let s = start_with(config(|c| {
        c.limits.join_rate_per_connection = 1;
        c.limits.max_topics_per_connection = 3;
    }))
    .await;
    let mut ws = ws_from(s.addr, "127.0.0.9", &[]).await.unwrap();
    for (i, topic) in ["r:1", "r:2", "r:3"].iter().enumerate() {
        join(&mut ws, &(i + 1).to_string(), topic, "{}").await;
    }
    // Leaving frees a topic but not the join budget.
    send(&mut ws, r#"["1","9","r:1","phx_leave",{}]"#).await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.push(recv(&mut ws).await);
    }
    assert_eq!(seen[0][4]["status"], "ok", "{seen:?}");
    assert_eq!(seen[1][3], "phx_close", "{seen:?}");
    let reply = join_reply(&mut ws, "10", "r:4", "{}").await;
    assert_eq!(reply["status"], "error", "{reply}");
    assert_eq!(reply["response"]["reason"], "rate limited", "{reply}");
    assert_eq!(refusals(s.addr, "rate_limit").await, 1.0);
    // The connection and its channels carry on.
    publish(s.addr, "r:2", "still", "{}").await;
    assert_eq!(recv(&mut ws).await[3], "still");
    legitimate_client_works(s.addr, "127.0.0.10", "r:2").await;
}
