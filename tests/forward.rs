//! Client pushes forwarded to the application (`[forward]`, src/forward.rs): the "app" here is a
//! real HTTP server on a free port that records each request and answers by event name.

mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use tokio::sync::Semaphore;

/// What the app saw: the bearer it was given and each request's JSON body.
#[derive(Default)]
struct Seen {
    bearers: Vec<String>,
    bodies: Vec<Value>,
    /// "hold" requests at the app now, and the most there ever were at once.
    holding: usize,
    most_holding: usize,
}

struct TestApp {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    /// Requests with event "hold" wait for a permit here.
    gate: Arc<Semaphore>,
}

/// Answers by event: "echo" 200 with `{"echo": payload}`, "refuse" 422 `{"reason": "nope"}`,
/// "empty" 204, "boom" 500, "notjson" 200 `hello`, "slow" after 2 s, "hold" once released.
async fn start_app() -> TestApp {
    start_app_with(None).await
}

/// A CA (PEM) and a TLS configuration for a server at 127.0.0.1 with a certificate it issued.
fn test_tls() -> (String, Arc<rustls_acme::rustls::ServerConfig>) {
    use rustls_acme::futures_rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let ca = TestCa::new(&["127.0.0.1"]);
    let provider = Arc::new(rustls_acme::rustls::crypto::ring::default_provider());
    let config = rustls_acme::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(ca.cert_der)],
            PrivateKeyDer::try_from(ca.key_der).unwrap(),
        )
        .unwrap();
    (ca.ca_pem, Arc::new(config))
}

/// [`start_app`], over TLS when `tls` is given.
async fn start_app_with(tls: Option<Arc<rustls_acme::rustls::ServerConfig>>) -> TestApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let gate = Arc::new(Semaphore::new(0));
    let (s, g) = (seen.clone(), gate.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (s, g) = (s.clone(), g.clone());
            let acceptor = tls.clone().map(tokio_rustls::TlsAcceptor::from);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (s, g) = (s.clone(), g.clone());
                        async move {
                            let bearer =
                                req.headers()["authorization"].to_str().unwrap().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let body: Value = serde_json::from_slice(&body).unwrap();
                            let event = body["event"].as_str().unwrap().to_string();
                            {
                                let mut seen = s.lock().unwrap();
                                seen.bearers.push(bearer);
                                seen.bodies.push(body.clone());
                            }
                            let (status, answer) = match event.as_str() {
                                "echo" => (200, json!({"echo": body["payload"]}).to_string()),
                                "refuse" => (422, r#"{"reason":"nope"}"#.to_string()),
                                "empty" => (204, String::new()),
                                "boom" => (500, "oops".to_string()),
                                "notjson" => (200, "hello".to_string()),
                                "slow" => {
                                    tokio::time::sleep(Duration::from_secs(2)).await;
                                    (200, "{}".to_string())
                                }
                                "hold" => {
                                    {
                                        let mut seen = s.lock().unwrap();
                                        seen.holding += 1;
                                        seen.most_holding = seen.most_holding.max(seen.holding);
                                    }
                                    g.acquire().await.unwrap().forget();
                                    s.lock().unwrap().holding -= 1;
                                    (200, json!({"n": body["payload"]["n"]}).to_string())
                                }
                                _ => (404, "{}".to_string()),
                            };
                            let resp = hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(answer)))
                                .unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    },
                );
                let http = hyper::server::conn::http1::Builder::new();
                let _ = match acceptor {
                    None => {
                        http.serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                            .await
                    }
                    Some(acceptor) => {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return; // a client that does not trust us
                        };
                        http.serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                            .await
                    }
                };
            });
        }
    });
    TestApp { addr, seen, gate }
}

/// The reply to a push the app did not answer properly: nothing about why.
fn generic_failure() -> Value {
    json!({"status": "error", "response": {"reason": "forward failed"}})
}

/// The sample of `pushgate_forward_failures_total` for `reason`.
fn failures(reason: &str) -> String {
    format!("pushgate_forward_failures_total{{reason=\"{reason}\"}}")
}

fn forwarding_config(app: SocketAddr) -> pushgate::Config {
    let mut c = test_config();
    c.forward.url = format!("http://{app}/pushgate/push");
    c.forward.topics = vec!["room:*".into()];
    c.forward.timeout_ms = 500;
    c.forward.max_queued = 4;
    c
}

async fn push(ws: &mut Ws, msg_ref: &str, topic: &str, event: &str, payload: Value) {
    let frame = json!(["1", msg_ref, topic, event, payload]);
    send(ws, &frame.to_string()).await;
}

/// The next reply (skipping broadcasts); asserts its refs and topic; returns `{status, response}`.
async fn reply(ws: &mut Ws, msg_ref: &str, topic: &str) -> Value {
    let r = recv(ws).await;
    assert_eq!(r[3], "phx_reply", "{r}");
    assert_eq!(
        (&r[0], &r[1], &r[2]),
        (&json!("1"), &json!(msg_ref), &json!(topic)),
        "{r}"
    );
    r[4].clone()
}

#[tokio::test]
async fn pushes_go_to_the_app_and_its_answer_is_the_reply() {
    let app = start_app().await;
    let s = start_with(forwarding_config(app.addr)).await;
    let url = format!("ws://{}/socket/websocket?vsn=2.0.0&token=user-7", s.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    join(&mut ws, "1", "room:lobby", "{}").await;

    push(&mut ws, "2", "room:lobby", "echo", json!({"body": "hi"})).await;
    assert_eq!(
        reply(&mut ws, "2", "room:lobby").await,
        json!({"status": "ok", "response": {"echo": {"body": "hi"}}})
    );
    {
        let seen = app.seen.lock().unwrap();
        assert_eq!(seen.bearers[0], format!("Bearer {TOKEN}"));
        let mut body = seen.bodies[0].clone();
        let sender = body.as_object_mut().unwrap().remove("sender").unwrap();
        assert_eq!(
            body,
            json!({"topic": "room:lobby", "event": "echo", "payload": {"body": "hi"}, "token": "user-7"})
        );
        let sender = sender.as_str().unwrap();
        assert!(
            sender.starts_with(&format!("{}.", s.app.node_id)),
            "{sender}"
        );
    }

    let cases = [
        (
            "refuse",
            json!({"status": "error", "response": {"reason": "nope"}}),
        ),
        ("empty", json!({"status": "ok", "response": {}})),
    ];
    for (i, (event, want)) in cases.into_iter().enumerate() {
        let r = (10 + i).to_string();
        push(&mut ws, &r, "room:lobby", event, json!({})).await;
        assert_eq!(reply(&mut ws, &r, "room:lobby").await, want, "{event}");
    }
    // Failures: the client gets a generic reply; why is in the metric (and the log).
    for (i, event) in ["boom", "notjson", "slow"].into_iter().enumerate() {
        let r = (20 + i).to_string();
        push(&mut ws, &r, "room:lobby", event, json!({})).await;
        let got = reply(&mut ws, &r, "room:lobby").await;
        assert_eq!(got, generic_failure(), "{event}");
    }
    for reason in ["status", "bad_answer", "timeout"] {
        assert_eq!(
            metric(s.addr, &failures(reason)).await,
            Some(1.0),
            "{reason}"
        );
    }

    // Topics outside forward.topics, and binary pushes, are refused as before.
    join(&mut ws, "1", "news:x", "{}").await;
    push(&mut ws, "30", "news:x", "echo", json!({})).await;
    let got = reply(&mut ws, "30", "news:x").await;
    assert_eq!(
        got["response"]["reason"],
        "client pushes are not accepted on this topic"
    );

    // The connection still delivers broadcasts.
    let position = publish(s.addr, "room:lobby", "note", "{}").await;
    assert_eq!(recv(&mut ws).await[1], position);
    let sum = |r: &str| format!("pushgate_forward_requests_total{{result=\"{r}\"}}");
    assert_eq!(metric(s.addr, &sum("ok")).await, Some(2.0));
    assert_eq!(metric(s.addr, &sum("error")).await, Some(1.0));
    assert_eq!(metric(s.addr, &sum("failed")).await, Some(3.0));
}

#[tokio::test]
async fn one_connections_pushes_reach_the_app_in_order_and_the_queue_is_bounded() {
    let app = start_app().await;
    let mut config = forwarding_config(app.addr);
    config.forward.timeout_ms = 10_000;
    let s = start_with(config).await;
    let mut ws = connect(s.addr).await;
    join(&mut ws, "1", "room:order", "{}").await;
    // The app holds every request: one is at the app, four wait (forward.max_queued), the
    // rest are refused at once.
    push(&mut ws, "100", "room:order", "hold", json!({"n": 0})).await;
    wait_until(|| app.seen.lock().unwrap().bodies.len() == 1).await;
    for n in 1..8 {
        push(
            &mut ws,
            &format!("{}", 100 + n),
            "room:order",
            "hold",
            json!({"n": n}),
        )
        .await;
    }
    let mut refused = Vec::new();
    for _ in 0..3 {
        let r = recv(&mut ws).await;
        assert_eq!(r[4]["status"], "error", "{r}");
        assert_eq!(
            r[4]["response"]["reason"],
            "too many pushes waiting for the app (forward.max_queued)"
        );
        refused.push(r[1].as_str().unwrap().to_string());
    }
    assert_eq!(refused, ["105", "106", "107"]);
    app.gate.add_permits(8);
    for n in 0..5 {
        let got = reply(&mut ws, &format!("{}", 100 + n), "room:order").await;
        assert_eq!(got, json!({"status": "ok", "response": {"n": n}}));
    }
    let order: Vec<Value> = app
        .seen
        .lock()
        .unwrap()
        .bodies
        .iter()
        .map(|b| b["payload"]["n"].clone())
        .collect();
    assert_eq!(order, [0, 1, 2, 3, 4]);
}

/// `forward.max_concurrent` bounds the requests at the app across connections: with 2, four
/// connections' pushes reach the app two at a time, each next one only once one is answered.
#[tokio::test]
async fn forward_max_concurrent_bounds_requests_at_the_app_across_connections() {
    let app = start_app().await;
    let mut config = forwarding_config(app.addr);
    config.forward.timeout_ms = 10_000;
    config.forward.max_concurrent = 2;
    let s = start_with(config).await;
    let mut clients = Vec::new();
    for i in 0..4 {
        let mut ws = connect(s.addr).await;
        join(&mut ws, "1", "room:conc", "{}").await;
        push(&mut ws, "10", "room:conc", "hold", json!({"n": i})).await;
        clients.push(ws);
    }
    let seen = |n: usize| app.seen.lock().unwrap().bodies.len() >= n;
    wait_until(|| seen(2)).await;
    for k in 0..4 {
        // One answer lets exactly one more in.
        app.gate.add_permits(1);
        if k < 2 {
            wait_until(|| seen(3 + k)).await;
        }
    }
    for ws in &mut clients {
        assert_eq!(reply(ws, "10", "room:conc").await["status"], "ok");
    }
    let seen = app.seen.lock().unwrap();
    assert_eq!(seen.bodies.len(), 4);
    assert_eq!(seen.most_holding, 2, "requests at the app at once");
}

#[tokio::test]
async fn an_unreachable_app_fails_each_push_with_a_reason_and_the_node_keeps_serving() {
    let mut config = test_config();
    config.forward.url = format!("http://127.0.0.1:{}/push", free_port());
    config.forward.topics = vec!["*".into()];
    let s = start_with(config).await;
    let mut ws = connect(s.addr).await;
    join(&mut ws, "1", "room:lobby", "{}").await;
    for r in ["2", "3"] {
        push(&mut ws, r, "room:lobby", "echo", json!({})).await;
        let got = reply(&mut ws, r, "room:lobby").await;
        assert_eq!(got, generic_failure());
    }
    assert_eq!(metric(s.addr, &failures("connect")).await, Some(2.0));
    let position = publish(s.addr, "room:lobby", "note", "{}").await;
    assert_eq!(recv(&mut ws).await[1], position);
}

#[tokio::test]
async fn an_https_app_is_reached_when_its_ca_is_trusted_and_refused_otherwise() {
    let (ca_pem, tls) = test_tls();
    let app = start_app_with(Some(tls)).await;
    let dir = std::env::temp_dir().join(format!("pushgate-forward-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    for (root_ca_file, want) in [
        (ca_file.display().to_string(), "ok"),
        (String::new(), "error"),
    ] {
        let mut config = forwarding_config(app.addr);
        config.forward.url = format!("https://{}/pushgate/push", app.addr);
        config.forward.root_ca_file = root_ca_file;
        let s = start_with(config).await;
        let mut ws = connect(s.addr).await;
        join(&mut ws, "1", "room:tls", "{}").await;
        push(&mut ws, "2", "room:tls", "echo", json!({"n": 1})).await;
        let got = reply(&mut ws, "2", "room:tls").await;
        assert_eq!(got["status"], want, "{got}");
        if want == "error" {
            assert_eq!(got, generic_failure());
            assert_eq!(metric(s.addr, &failures("connect")).await, Some(1.0));
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Pushes once on `ws` (joined to `topic`) and returns the `sender` the app was told.
async fn sender_of(app: &TestApp, ws: &mut Ws, topic: &str) -> String {
    push(ws, "9", topic, "echo", json!({})).await;
    assert_eq!(reply(ws, "9", topic).await["status"], "ok");
    let seen = app.seen.lock().unwrap();
    seen.bodies.last().unwrap()["sender"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The events of the next `n` frames.
async fn events(ws: &mut Ws, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(recv(ws).await[3].as_str().unwrap().to_string());
    }
    out
}

#[tokio::test]
async fn a_publish_can_leave_out_the_pusher_send_to_others() {
    let app = start_app().await;
    let s = start_with(forwarding_config(app.addr)).await;
    // More subscribers than a publish wakes inline, so the fanout sweep delivers too.
    let mut others = Vec::new();
    for _ in 0..70 {
        let mut ws = connect(s.addr).await;
        join(&mut ws, "1", "room:o", "{}").await;
        others.push(ws);
    }
    let mut ann = connect(s.addr).await;
    join(&mut ann, "1", "room:o", "{}").await;
    let sender = sender_of(&app, &mut ann, "room:o").await;
    let bearer = format!("Bearer {TOKEN}");
    // One message alone (written straight to parked connections), then a batch whose first
    // message every connection takes with the second (the connection's own read).
    let alone = json!({"topic": "room:o", "event": "said", "payload": {}, "exclude": sender});
    let (status, _, body) = post_publish(s.addr, Some(&bearer), alone.to_string().as_bytes()).await;
    assert_eq!(status, 200, "{body}");
    let batch = json!([
        {"topic": "room:o", "event": "said-too", "payload": {}, "exclude": sender},
        {"topic": "room:o", "event": "for-all", "payload": {}},
    ]);
    let (status, _, body) = post_publish(s.addr, Some(&bearer), batch.to_string().as_bytes()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        events(&mut ann, 1).await,
        ["for-all"],
        "the pusher is left out"
    );
    for ws in &mut others {
        assert_eq!(events(ws, 3).await, ["said", "said-too", "for-all"]);
    }
    // Another node's sender id leaves nobody here out; a malformed one is refused.
    let foreign = json!({"topic": "room:o", "event": "x", "payload": {}, "exclude": "ffffffff.1"});
    assert_eq!(
        post_publish(s.addr, Some(&bearer), foreign.to_string().as_bytes())
            .await
            .0,
        200
    );
    assert_eq!(events(&mut ann, 1).await, ["x"]);
    let bad = json!({"topic": "room:o", "event": "x", "payload": {}, "exclude": "me"});
    let (status, _, body) = post_publish(s.addr, Some(&bearer), bad.to_string().as_bytes()).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("sender id"),
        "{body}"
    );
}

#[tokio::test]
async fn with_redis_the_pusher_is_left_out_on_its_node_and_the_others_get_it_everywhere() {
    let app = start_app().await;
    let redis = RedisServer::start();
    let node = |c: pushgate::Config| async move {
        let s = start_with(c).await;
        wait_ready(s.addr, 200).await;
        s
    };
    let mut c = forwarding_config(app.addr);
    c.redis.url = redis.url();
    let a = node(c.clone()).await;
    let b = node(c).await;
    let mut ann = connect(a.addr).await;
    let mut amy = connect(a.addr).await;
    let mut bob = connect(b.addr).await;
    for ws in [&mut ann, &mut amy, &mut bob] {
        join(ws, "1", "room:r", "{}").await;
    }
    let sender = sender_of(&app, &mut ann, "room:r").await;
    // Published on the other node, straight into Redis's script like any publish.
    let bearer = format!("Bearer {TOKEN}");
    let body = json!([
        {"topic": "room:r", "event": "said", "payload": {}, "exclude": sender},
        {"topic": "room:r", "event": "for-all", "payload": {}},
    ]);
    assert_eq!(
        post_publish(b.addr, Some(&bearer), body.to_string().as_bytes())
            .await
            .0,
        200
    );
    assert_eq!(events(&mut ann, 1).await, ["for-all"]);
    assert_eq!(events(&mut amy, 2).await, ["said", "for-all"]);
    assert_eq!(events(&mut bob, 2).await, ["said", "for-all"]);
}
