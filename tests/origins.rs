//! `server.allowed_origins` (src/origin.rs): WebSocket upgrades and LongPoll requests from other
//! pages get 403 and are counted; listed origins (exact and `*.` subdomains) work end to end; CORS
//! answers name only listed origins, and the preflight allows a fixed list of headers.

mod support;

use serde_json::Value;
use std::net::SocketAddr;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const APP: &str = "https://app.example.com";
const SUB: &str = "https://chat.eu.example.org";
const EVIL: &str = "https://evil.example.net";
/// What the preflight allows, whatever is asked for: the headers phoenix.js sends.
const ALLOWED_HEADERS: &str = "accept, content-type, x-phoenix-authtoken";

fn restricted() -> pushgate::Config {
    let mut c = test_config();
    c.server.allowed_origins = vec![APP.into(), "https://*.example.org".into()];
    c
}

async fn origin_refusals(addr: SocketAddr) -> f64 {
    metric(addr, r#"pushgate_refusals_total{cause="origin"}"#)
        .await
        .expect("pushgate_refusals_total{cause=\"origin\"} is exported")
}

/// A WebSocket handshake with `origin` (none when `None`): the socket, or the refusal's status.
async fn ws_with_origin(addr: SocketAddr, origin: Option<&str>) -> Result<Ws, u16> {
    let mut req = format!("ws://{addr}/socket/websocket?vsn=2.0.0")
        .into_client_request()
        .unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    match tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake timed out")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

#[tokio::test]
async fn websocket_upgrades_from_other_origins_get_403_and_are_counted() {
    let s = start_with(restricted()).await;
    assert_eq!(origin_refusals(s.addr).await, 0.0);
    for bad in [
        EVIL,
        "null",
        "http://app.example.com",
        "https://example.org",
    ] {
        assert_eq!(
            ws_with_origin(s.addr, Some(bad)).await.err(),
            Some(403),
            "{bad}"
        );
    }
    assert_eq!(origin_refusals(s.addr).await, 4.0);
}

#[tokio::test]
async fn websockets_from_listed_origins_and_without_origin_receive_messages() {
    let s = start_with(restricted()).await;
    let mut sockets = Vec::new();
    for origin in [Some(APP), Some(SUB), None] {
        let mut ws = ws_with_origin(s.addr, origin)
            .await
            .unwrap_or_else(|st| panic!("{origin:?} refused with {st}"));
        join(&mut ws, "1", "room:origins", "{}").await;
        sockets.push(ws);
    }
    publish(s.addr, "room:origins", "hello", r#"{"n":1}"#).await;
    for ws in &mut sockets {
        let m = recv(ws).await;
        assert_eq!(
            (m[3].as_str(), m[4]["n"].as_i64()),
            (Some("hello"), Some(1))
        );
    }
    assert_eq!(origin_refusals(s.addr).await, 0.0);
}

#[tokio::test]
async fn longpoll_requests_from_other_origins_get_403() {
    let s = start_with(restricted()).await;
    // A session made without an Origin, which the refused requests then name.
    let (_, _, body) = http(s.addr, "GET", "/socket/longpoll?vsn=2.0.0", &[], b"").await;
    let token = body_json(&body)["token"].as_str().unwrap().to_string();
    let poll = format!("/socket/longpoll?vsn=2.0.0&token={token}");
    let join = br#"["1","1","room:lp","phx_join",{}]"#;
    for (method, path, body) in [
        ("GET", "/socket/longpoll?vsn=2.0.0", &b""[..]),
        ("GET", poll.as_str(), &b""[..]),
        ("POST", poll.as_str(), &join[..]),
    ] {
        let (status, head, answer) = http(s.addr, method, path, &[("Origin", EVIL)], body).await;
        assert_eq!(status, 403, "{method} {path}\n{head}");
        // phoenix.js reads the status from the body (tests/js/origins.test.js).
        assert_eq!(body_json(&answer), serde_json::json!({"status": 403}));
        assert_eq!(header(&head, "access-control-allow-origin"), None, "{head}");
    }
    // The same on a connection hyper serves (its first request is not a LongPoll one).
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let req = format!(
        "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET {poll} HTTP/1.1\r\nHost: t\r\nOrigin: {EVIL}\r\nConnection: close\r\n\r\n"
    );
    c.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, c.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    let second = out.match_indices("HTTP/1.1 ").nth(1).expect(&out).0;
    assert_eq!(&out[second + 9..second + 12], "403", "{out}");
    assert_eq!(origin_refusals(s.addr).await, 4.0);
    // The session never saw the refused join.
    let (_, _, body) = http(s.addr, "POST", &poll, &[], join).await;
    assert_eq!(body_json(&body)["status"], 200);
}

/// GET, join by POST, publish, GET: what phoenix.js does, from `origin`.
async fn longpoll_receives(addr: SocketAddr, origin: &str, topic: &str) {
    let o = [("Origin", origin)];
    let (status, head, body) = http(addr, "GET", "/socket/longpoll?vsn=2.0.0", &o, b"").await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(
        header(&head, "access-control-allow-origin").as_deref(),
        Some(origin),
        "{head}"
    );
    assert!(
        header(&head, "vary").is_some_and(|v| v.to_ascii_lowercase().contains("origin")),
        "{head}"
    );
    let first = body_json(&body);
    assert_eq!(first["status"], 410, "{first}");
    let poll = format!(
        "/socket/longpoll?vsn=2.0.0&token={}",
        first["token"].as_str().unwrap()
    );
    let join = format!(r#"["1","1","{topic}","phx_join",{{}}]"#);
    let (_, head, body) = http(addr, "POST", &poll, &o, join.as_bytes()).await;
    assert_eq!(body_json(&body)["status"], 200, "{head}");
    assert_eq!(
        header(&head, "access-control-allow-origin").as_deref(),
        Some(origin)
    );
    let (_, _, body) = http(addr, "GET", &poll, &o, b"").await;
    let reply: Value = serde_json::from_str(body_json(&body)["messages"][0].as_str().unwrap())
        .expect("the join reply");
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    publish(addr, topic, "hello", r#"{"n":2}"#).await;
    let (_, _, body) = http(addr, "GET", &poll, &o, b"").await;
    let m: Value = serde_json::from_str(body_json(&body)["messages"][0].as_str().unwrap()).unwrap();
    assert_eq!(
        (m[3].as_str(), m[4]["n"].as_i64()),
        (Some("hello"), Some(2))
    );
}

#[tokio::test]
async fn longpoll_from_listed_origins_receives_messages_with_cors_for_that_origin() {
    let s = start_with(restricted()).await;
    longpoll_receives(s.addr, APP, "room:exact").await;
    longpoll_receives(s.addr, SUB, "room:wild").await;
    assert_eq!(origin_refusals(s.addr).await, 0.0);
}

async fn preflight(addr: SocketAddr, origin: &str) -> (u16, String) {
    let (status, head, _) = http(
        addr,
        "OPTIONS",
        "/socket/longpoll?vsn=2.0.0",
        &[
            ("Origin", origin),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "x-evil, content-type, authorization",
            ),
        ],
        b"",
    )
    .await;
    (status, head)
}

#[tokio::test]
async fn the_preflight_answers_listed_origins_only_with_a_fixed_header_list() {
    let s = start_with(restricted()).await;
    for origin in [APP, SUB] {
        let (status, head) = preflight(s.addr, origin).await;
        assert!((200..300).contains(&status), "{head}");
        assert_eq!(
            header(&head, "access-control-allow-origin").as_deref(),
            Some(origin)
        );
        assert_eq!(
            header(&head, "access-control-allow-headers").as_deref(),
            Some(ALLOWED_HEADERS),
            "{head}"
        );
        assert_eq!(
            header(&head, "access-control-allow-methods").as_deref(),
            Some("GET, POST"),
            "{head}"
        );
        assert!(header(&head, "vary").is_some_and(|v| v.to_ascii_lowercase().contains("origin")));
    }
    let (status, head) = preflight(s.addr, EVIL).await;
    assert_eq!(status, 403, "{head}");
    assert_eq!(header(&head, "access-control-allow-origin"), None, "{head}");
    assert_eq!(
        header(&head, "access-control-allow-headers"),
        None,
        "{head}"
    );
    assert_eq!(origin_refusals(s.addr).await, 1.0);

    // Open (the default): any origin, but still only the headers phoenix.js sends.
    let open = start().await;
    let (status, head) = preflight(open.addr, EVIL).await;
    assert!((200..300).contains(&status), "{head}");
    assert_eq!(
        header(&head, "access-control-allow-origin").as_deref(),
        Some("*")
    );
    assert_eq!(
        header(&head, "access-control-allow-headers").as_deref(),
        Some(ALLOWED_HEADERS),
        "{head}"
    );
}

#[test]
fn bad_patterns_are_named_by_validation() {
    let mut c = test_config();
    c.server.allowed_origins = vec![APP.into(), "*".into(), "https://app.example.com/".into()];
    let p = c.validate().unwrap_err();
    let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        ["server.allowed_origins", "server.allowed_origins"],
        "{p:?}"
    );
}
