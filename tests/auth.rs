//! Private topics (`[auth]`, src/auth.rs): joins need a connect token (JWT, HS256) whose
//! `channels` claim grants the topic, presented as a `token` connect param or as the phoenix.js
//! `authToken` (the WebSocket subprotocol, the LongPoll `X-Phoenix-AuthToken` header). Frame by
//! frame here; tests/js/auth.test.js runs the official client against the same rules.

mod support;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::net::SocketAddr;
use support::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "a-connect-token-secret-of-32-bytes!";

async fn private_server() -> TestServer {
    let mut c = test_config();
    c.auth.secret = SECRET.into();
    c.auth.private_topics = vec!["user:*".into(), "team:*".into()];
    start_with(c).await
}

fn token(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn grant(channels: &[&str]) -> String {
    let exp = jsonwebtoken::get_current_timestamp() + 600;
    token(
        json!({"exp": exp, "sub": "42", "channels": channels}),
        SECRET,
    )
}

/// A WebSocket with `query` after `vsn=2.0.0&`, and the subprotocols phoenix.js offers for an
/// `authToken`, when given.
async fn connect_as(addr: SocketAddr, query: &str, auth_token: Option<&str>) -> Ws {
    let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0&{query}");
    let mut req = url.into_client_request().unwrap();
    if let Some(t) = auth_token {
        use base64::Engine;
        let b = base64::engine::general_purpose::STANDARD_NO_PAD.encode(t);
        let offer = format!("phoenix, base64url.bearer.phx.{b}");
        req.headers_mut()
            .insert("sec-websocket-protocol", offer.parse().unwrap());
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    if auth_token.is_some() {
        assert_eq!(resp.headers()["sec-websocket-protocol"], "phoenix");
    }
    ws
}

fn assert_unauthorized(reply: &Value, detail: &str) {
    assert_eq!(reply["status"], "error", "{reply}");
    assert_eq!(reply["response"]["reason"], "unauthorized", "{reply}");
    let got = reply["response"]["detail"].as_str().unwrap_or_default();
    assert!(got.contains(detail), "detail {got:?} should say {detail:?}");
}

#[tokio::test]
async fn websocket_joins_of_private_topics_need_a_granting_token() {
    let s = private_server().await;
    // No token: public topics only.
    let mut ws = connect_as(s.addr, "", None).await;
    join(&mut ws, "1", "room:lobby", "{}").await;
    assert_unauthorized(
        &join_reply(&mut ws, "2", "user:42", "{}").await,
        "connect with a token",
    );

    // The token as a connect param, and as the authToken subprotocol.
    let t = grant(&["user:42", "team:*"]);
    for mut ws in [
        connect_as(s.addr, &format!("token={t}"), None).await,
        connect_as(s.addr, "", Some(&t)).await,
    ] {
        join(&mut ws, "1", "user:42", "{}").await;
        join(&mut ws, "2", "team:red", "{}").await;
        assert_unauthorized(
            &join_reply(&mut ws, "3", "user:43", "{}").await,
            "does not grant",
        );
        // The refused join took nothing away: the granted channel still gets its messages.
        let position = publish(s.addr, "user:42", "note", r#"{"n":1}"#).await;
        let msg = recv(&mut ws).await;
        assert_eq!(
            (msg[1].as_str(), &msg[2]),
            (Some(position.as_str()), &json!("user:42"))
        );
    }

    // Bad tokens are refused with the reason; the connection stays usable.
    let expired = token(json!({"exp": 1_000_000_000u64, "channels": ["*"]}), SECRET);
    let forged = token(
        json!({"exp": jsonwebtoken::get_current_timestamp() + 600, "channels": ["*"]}),
        "another-secret-of-at-least-32-bytes",
    );
    for (t, detail) in [(expired, "expired"), (forged, "signature")] {
        let mut ws = connect_as(s.addr, &format!("token={t}"), None).await;
        assert_unauthorized(&join_reply(&mut ws, "1", "user:42", "{}").await, detail);
        join(&mut ws, "2", "room:lobby", "{}").await;
    }
    assert!(metric(s.addr, "pushgate_join_errors_total").await.unwrap() >= 5.0);
}

#[tokio::test]
async fn longpoll_sessions_take_the_token_from_the_header_or_the_first_token_param() {
    let s = private_server().await;
    let t = grant(&["user:*"]);
    for (query, headers) in [
        // The client's own `token` param; LongPoll adds its session token after it.
        (format!("token={t}&vsn=2.0.0"), vec![]),
        // phoenix.js 1.8 `authToken`: the header on the session's first GET.
        (
            "vsn=2.0.0".to_string(),
            vec![("X-Phoenix-AuthToken", t.as_str())],
        ),
    ] {
        let path = format!("/socket/longpoll?{query}");
        let (_, _, body) = try_http(s.addr, "GET", &path, &headers, b"").await.unwrap();
        let session = body_json(&body)["token"].as_str().unwrap().to_string();
        let path = format!("/socket/longpoll?{query}&token={session}");
        let lines = [
            r#"["1","1","user:7","phx_join",{}]"#,
            r#"["2","2","team:blue","phx_join",{}]"#,
        ]
        .join("\n");
        let ndjson = [("Content-Type", "application/x-ndjson")];
        let (status, _, _) = try_http(s.addr, "POST", &path, &ndjson, lines.as_bytes())
            .await
            .unwrap();
        assert_eq!(status, 200);
        let (_, _, body) = try_http(s.addr, "GET", &path, &[], b"").await.unwrap();
        let replies: Vec<Value> = body_json(&body)["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| serde_json::from_str(m.as_str().unwrap()).unwrap())
            .collect();
        assert_eq!(replies.len(), 2, "{replies:?}");
        assert_eq!(replies[0][4]["status"], "ok", "{query}: {replies:?}");
        assert_unauthorized(&replies[1][4], "does not grant");
    }
}
