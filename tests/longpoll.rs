//! Phoenix LongPoll (`/socket/longpoll`, PHOENIX-PROTOCOL.md §2), exchange by exchange, against
//! a real server on 127.0.0.1:0. Every request is raw HTTP/1.1 on its own TCP connection, so two
//! requests in flight for one session really are two connections, as with a browser.

mod support;

use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;
use support::*;
use tokio::time::Instant;

/// The first URL phoenix.js builds: a user param called `token`, `vsn`, and an empty segment.
const BASE: &str = "/socket/longpoll?token=user-secret&vsn=2.0.0&";

/// Waits until the server holds a GET for session `token` as its listener
/// (`Registry::is_held`), rather than for a fixed time that passes whether it arrived or not.
async fn until_held(s: &TestServer, token: &str) {
    let app = s.app.clone();
    wait_until(|| app.longpoll.is_held(token)).await;
}

/// A later URL: the user's `token` first, the session token last (as phoenix.js sends it).
fn url(token: &str) -> String {
    format!("{BASE}token={token}")
}

fn config(window_ms: u64) -> pushgate::Config {
    let mut c = test_config();
    c.longpoll.window_ms = window_ms;
    c
}

/// Checks the headers every LongPoll answer carries (§2.2).
fn assert_longpoll_headers(head: &str) {
    assert_eq!(
        header(head, "content-type").as_deref(),
        Some("application/json; charset=utf-8"),
        "{head}"
    );
    assert_eq!(
        header(head, "cache-control").as_deref(),
        Some("no-store"),
        "{head}"
    );
    assert_eq!(
        header(head, "access-control-allow-origin").as_deref(),
        Some("*"),
        "{head}"
    );
}

/// One LongPoll request; asserts HTTP 200 and the common headers; returns the body as JSON.
async fn lp(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Value {
    let (status, head, body) = try_http(addr, method, path, headers, body)
        .await
        .expect("longpoll request failed");
    assert_eq!(
        status,
        200,
        "LongPoll always answers HTTP 200: {head}\n{}",
        String::from_utf8_lossy(&body)
    );
    assert_longpoll_headers(&head);
    serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&body)))
}

async fn get(addr: SocketAddr, token: &str) -> Value {
    lp(addr, "GET", &url(token), &[], b"").await
}

/// A GET and how long it took.
async fn get_timed(addr: SocketAddr, token: &str) -> (Value, Duration) {
    let t0 = Instant::now();
    let body = get(addr, token).await;
    (body, t0.elapsed())
}

async fn post(addr: SocketAddr, token: &str, ndjson: &str) -> Value {
    lp(
        addr,
        "POST",
        &url(token),
        &[("Content-Type", "application/x-ndjson")],
        ndjson.as_bytes(),
    )
    .await
}

/// Posts and checks the answer is `{"status":200}`.
async fn post_ok(addr: SocketAddr, token: &str, ndjson: &str) {
    assert_eq!(post(addr, token, ndjson).await, json!({"status": 200}));
}

/// A 200 answer's token: the session's, then the number of its last frame (8 hex digits).
fn assert_session_token(body: &Value, session: &str) {
    let t = body["token"].as_str().unwrap_or_default();
    assert!(
        t.len() == session.len() + 8
            && t.starts_with(session)
            && t[session.len()..].bytes().all(|b| b.is_ascii_hexdigit()),
        "{body}"
    );
}

fn is_our_token(t: &str) -> bool {
    t.len() == 34 && t.starts_with("lp") && t[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// The first GET: a new session. Checks the whole 410 answer; returns the token.
async fn new_session(addr: SocketAddr) -> String {
    let body = lp(addr, "GET", BASE, &[("Accept", "application/json")], b"").await;
    let token = body["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token in {body}"))
        .to_string();
    assert!(is_our_token(&token), "token shape: {token}");
    assert_eq!(
        body,
        json!({"status": 410, "token": token, "messages": []}),
        "first GET"
    );
    token
}

/// The frames of a poll answer. Each element of `messages` must be a JSON *string* holding one
/// frame (§2.2), not a nested array.
fn frames(body: &Value) -> Vec<Value> {
    body["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages array in {body}"))
        .iter()
        .map(|m| {
            let text = m
                .as_str()
                .unwrap_or_else(|| panic!("message {m} is not a JSON string"));
            serde_json::from_str(text).unwrap_or_else(|e| panic!("message {text:?}: {e}"))
        })
        .collect()
}

/// Polls until `n` frames have arrived (frames waiting make a GET answer at once); checks
/// every answer is a 200/204 for `token`. Panics on more than `n` frames or at the deadline.
async fn collect(addr: SocketAddr, token: &str, n: usize) -> Vec<Value> {
    let end = Instant::now() + DEADLINE;
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            Instant::now() < end,
            "only {} of {n} frames: {out:?}",
            out.len()
        );
        let body = get(addr, token).await;
        // The session's token, followed by an acknowledgement number in a 200 answer.
        let answered = body["token"].as_str().unwrap_or_default();
        assert!(answered.starts_with(token), "{body}");
        match body["status"].as_u64() {
            Some(200) => {
                let f = frames(&body);
                assert!(!f.is_empty(), "a 200 poll must carry messages: {body}");
                out.extend(f);
            }
            Some(204) => assert_eq!(body["messages"], json!([]), "{body}"),
            _ => panic!("unexpected poll answer {body}"),
        }
    }
    assert_eq!(out.len(), n, "more frames than expected: {out:?}");
    out
}

/// Publishes a batch; returns the positions.
async fn publish_batch(
    addr: SocketAddr,
    topic: &str,
    event: &str,
    payloads: &[String],
) -> Vec<String> {
    let items: Vec<Value> = payloads
        .iter()
        .map(|p| {
            json!({"topic": topic, "event": event, "payload": serde_json::from_str::<Value>(p).unwrap()})
        })
        .collect();
    let auth = format!("Bearer {TOKEN}");
    let (status, _, body) = post_publish(
        addr,
        Some(&auth),
        Value::Array(items).to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["positions"]
        .as_array()
        .expect("positions")
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

/// Waits until the `/metrics` sample equals `want`.
async fn wait_metric(addr: SocketAddr, sample: &str, want: f64) {
    let end = Instant::now() + DEADLINE;
    loop {
        let v = metric(addr, sample).await;
        if v == Some(want) {
            return;
        }
        assert!(Instant::now() < end, "{sample} is {v:?}, want {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn join_line(join_ref: &str, topic: &str, params: &str) -> String {
    format!(r#"["{join_ref}","{join_ref}","{topic}","phx_join",{params}]"#)
}

/// Checks `f` is the ok reply to a join; returns its `response`.
fn assert_join_ok(f: &Value, join_ref: &str, topic: &str) -> Value {
    assert_eq!(f[0], join_ref, "{f}");
    assert_eq!(f[1], join_ref, "{f}");
    assert_eq!(f[2], topic, "{f}");
    assert_eq!(f[3], "phx_reply", "{f}");
    assert_eq!(f[4]["status"], "ok", "{f}");
    assert!(f[4]["response"]["position"].is_string(), "{f}");
    f[4]["response"].clone()
}

fn heartbeat_reply(msg_ref: &str) -> Value {
    json!([null, msg_ref, "phoenix", "phx_reply", {"status": "ok", "response": {}}])
}

/// POSTs a join and GETs its reply; returns the join position.
async fn join(addr: SocketAddr, token: &str, join_ref: &str, topic: &str) -> String {
    post_ok(addr, token, &join_line(join_ref, topic, "{}")).await;
    let f = collect(addr, token, 1).await;
    let response = assert_join_ok(&f[0], join_ref, topic);
    response["position"].as_str().unwrap().to_string()
}

fn offset(position: &str) -> u64 {
    split_position(position).1
}

// 1 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn first_get_creates_a_session_and_answers_410_with_a_token() {
    let s = start_with(config(300)).await;
    let (status, head, body) = http(s.addr, "GET", BASE, &[], b"").await;
    assert_eq!(status, 200);
    assert_longpoll_headers(&head);
    let body: Value = serde_json::from_slice(&body).unwrap();
    let t = body["token"].as_str().expect("token").to_string();
    assert!(is_our_token(&t), "token must be lp + 32 hex: {t}");
    assert_eq!(body, json!({"status": 410, "token": t, "messages": []}));

    let t2 = new_session(s.addr).await;
    assert_ne!(t, t2, "every session gets its own token");
    assert_eq!(
        metric(s.addr, r#"pushgate_connections{transport="longpoll"}"#).await,
        Some(2.0)
    );
}

// 2 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_session_token_is_the_last_query_value_or_the_header() {
    let s = start_with(config(300)).await;
    let t1 = new_session(s.addr).await;
    let t2 = new_session(s.addr).await;

    // Query: the user's `token=user-secret` comes first, the session token last.
    post_ok(s.addr, &t1, r#"[null,"11","phoenix","heartbeat",{}]"#).await;
    // Header: the query carries only the user's token.
    assert_eq!(
        lp(
            s.addr,
            "POST",
            BASE,
            &[("X-Phoenix-Longpoll-Token", &t2)],
            br#"[null,"22","phoenix","heartbeat",{}]"#,
        )
        .await,
        json!({"status": 200})
    );

    // The header wins over the query's token.
    let body = lp(
        s.addr,
        "GET",
        &url(&t2),
        &[("X-Phoenix-Longpoll-Token", &t1)],
        b"",
    )
    .await;
    assert_eq!(body["status"], 200, "{body}");
    assert_session_token(&body, &t1);
    assert_eq!(frames(&body), vec![heartbeat_reply("11")]);

    let body = get(s.addr, &t2).await;
    assert_session_token(&body, &t2);
    assert_eq!(frames(&body), vec![heartbeat_reply("22")]);

    // With the session token first and a user token last, the last one counts: it is not
    // ours, so this is a new session.
    let body = lp(
        s.addr,
        "GET",
        &format!("/socket/longpoll?token={t1}&vsn=2.0.0&token=user-secret"),
        &[],
        b"",
    )
    .await;
    assert_eq!(body["status"], 410, "{body}");
    let t3 = body["token"].as_str().unwrap();
    assert!(is_our_token(t3) && t3 != t1 && t3 != t2, "{body}");

    // A new session needs vsn 2.x.
    for path in [
        "/socket/longpoll?token=user-secret&",
        "/socket/longpoll?token=user-secret&vsn=1.0.0&",
    ] {
        let body = lp(s.addr, "GET", path, &[], b"").await;
        assert_eq!(body, json!({"status": 403}), "{path}");
    }
    assert_eq!(
        metric(s.addr, r#"pushgate_connections{transport="longpoll"}"#).await,
        Some(3.0),
        "a refused GET creates no session"
    );
}

// 3 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn posted_lines_are_answered_in_order_through_the_next_get() {
    let s = start_with(config(300)).await;
    let t = new_session(s.addr).await;
    let (status, head, body) = http(
        s.addr,
        "POST",
        &url(&t),
        &[("Content-Type", "application/x-ndjson")],
        b"[\"6\",\"6\",\"room:lobby\",\"phx_join\",{}]\n[null,\"7\",\"phoenix\",\"heartbeat\",{}]",
    )
    .await;
    assert_eq!(status, 200);
    assert_longpoll_headers(&head);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({"status": 200})
    );

    let (body, elapsed) = get_timed(s.addr, &t).await;
    assert!(
        elapsed < Duration::from_millis(250),
        "waiting replies are answered at once, took {elapsed:?}"
    );
    assert_eq!(body["status"], 200, "{body}");
    assert_session_token(&body, &t);
    let msgs = body["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2, "{body}");
    assert!(
        msgs.iter().all(Value::is_string),
        "messages must be strings: {body}"
    );
    let f = frames(&body);
    let response = assert_join_ok(&f[0], "6", "room:lobby");
    assert!(
        response["position"].as_str().unwrap().ends_with(":0"),
        "{response}"
    );
    assert_eq!(f[1], heartbeat_reply("7"));
}

// 4 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_idle_get_is_held_for_the_window_then_answers_204() {
    let s = start_with(config(300)).await;
    let t = new_session(s.addr).await;
    let (body, elapsed) = get_timed(s.addr, &t).await;
    assert_eq!(body, json!({"status": 204, "token": t, "messages": []}));
    assert!(
        elapsed >= Duration::from_millis(290),
        "answered before the window ended: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_millis(1600),
        "held far past the window: {elapsed:?}"
    );
    // Still the same session afterwards.
    let (body, _) = get_timed(s.addr, &t).await;
    assert_eq!(body, json!({"status": 204, "token": t, "messages": []}));
}

#[tokio::test]
async fn a_held_get_returns_promptly_when_a_message_is_published() {
    let s = start_with(config(4000)).await;
    let t = new_session(s.addr).await;
    join(s.addr, &t, "6", "room:lobby").await;

    let addr = s.addr;
    let tt = t.clone();
    let held = tokio::spawn(async move { get(addr, &tt).await });
    until_held(&s, &t).await;
    assert!(
        !held.is_finished(),
        "the GET must be held while nothing is waiting"
    );

    let t0 = Instant::now();
    let pos = publish(s.addr, "room:lobby", "new_msg", r#"{"body":"hi"}"#).await;
    let body = tokio::time::timeout(DEADLINE, held).await.unwrap().unwrap();
    let elapsed = t0.elapsed();
    assert!(
        elapsed < Duration::from_millis(1500),
        "the held GET must answer on publish, not at the window's end: {elapsed:?}"
    );
    assert_eq!(body["status"], 200, "{body}");
    assert_session_token(&body, &t);
    assert_eq!(
        frames(&body),
        vec![json!([null, pos, "room:lobby", "new_msg", {"body": "hi"}])]
    );
    assert_eq!(
        metric(
            s.addr,
            r#"pushgate_messages_delivered_total{transport="longpoll"}"#
        )
        .await,
        Some(1.0)
    );
}

/// §2.4: the client's GET is usually in flight when it POSTs; the replies go to that GET.
#[tokio::test]
async fn a_post_wakes_the_held_get_with_its_replies() {
    let s = start_with(config(4000)).await;
    let t = new_session(s.addr).await;
    let addr = s.addr;
    let tt = t.clone();
    let held = tokio::spawn(async move { get(addr, &tt).await });
    until_held(&s, &t).await;
    assert!(!held.is_finished());

    let t0 = Instant::now();
    post_ok(s.addr, &t, r#"[null,"9","phoenix","heartbeat",{}]"#).await;
    let body = tokio::time::timeout(DEADLINE, held).await.unwrap().unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(body["status"], 200, "{body}");
    assert_session_token(&body, &t);
    assert_eq!(frames(&body), vec![heartbeat_reply("9")]);
}

// 5 ------------------------------------------------------------------------------------------

/// The recommended handling of a second GET (§2.5): the held one ends with 204 and the new one
/// is the listener, so a frame is never written into an abandoned response. Several rounds,
/// because whether the superseded GET touches the session's waker last is up to scheduling.
#[tokio::test]
async fn a_second_get_finishes_the_first_with_204_and_takes_over() {
    let s = start_with(config(4000)).await;
    let t = new_session(s.addr).await;
    join(s.addr, &t, "6", "room:lobby").await;
    let addr = s.addr;

    for round in 0..5 {
        let ta = t.clone();
        let a = tokio::spawn(async move {
            let body = get(addr, &ta).await;
            (body, Instant::now())
        });
        until_held(&s, &t).await;
        assert!(!a.is_finished(), "round {round}: GET A must be held");

        let b_started = Instant::now();
        let tb = t.clone();
        let b = tokio::spawn(async move { get(addr, &tb).await });
        let (a_body, a_done) = tokio::time::timeout(DEADLINE, a).await.unwrap().unwrap();
        let a_after_b = a_done - b_started;
        assert!(
            a_after_b < Duration::from_millis(1500),
            "round {round}: A must end when B arrives, not at its window's end: {a_after_b:?}"
        );
        assert_eq!(
            a_body,
            json!({"status": 204, "token": t, "messages": []}),
            "round {round}"
        );
        assert!(
            !b.is_finished(),
            "round {round}: B must be the held listener now"
        );

        let pos = publish(
            s.addr,
            "room:lobby",
            "after",
            &format!(r#"{{"n":{round}}}"#),
        )
        .await;
        let t0 = Instant::now();
        let b_body = tokio::time::timeout(DEADLINE, b).await.unwrap().unwrap();
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "round {round}: the publish must wake B, the new listener, at once; took {:?}: {b_body}",
            t0.elapsed()
        );
        assert_eq!(b_body["status"], 200, "round {round}: {b_body}");
        assert_eq!(
            frames(&b_body),
            vec![json!([null, pos, "room:lobby", "after", {"n": round}])],
            "round {round}"
        );
    }
}

// 6 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_post_with_too_many_lines_is_413_and_nothing_in_it_runs() {
    let mut c = config(300);
    c.longpoll.max_post_lines = 3;
    let s = start_with(c).await;
    let t = new_session(s.addr).await;

    let four = (1..=4)
        .map(|i| format!(r#"[null,"{i}","phoenix","heartbeat",{{}}]"#))
        .collect::<Vec<_>>()
        .join("\n");
    let body = post(s.addr, &t, &four).await;
    assert_ne!(body["status"], 200, "{body}");
    assert_eq!(body, json!({"status": 413}));
    // Nothing was handled: the next GET waits out the window.
    let (body, _) = get_timed(s.addr, &t).await;
    assert_eq!(body, json!({"status": 204, "token": t, "messages": []}));

    // Exactly the limit is fine, and the session lives on.
    let three = (1..=3)
        .map(|i| format!(r#"[null,"{i}","phoenix","heartbeat",{{}}]"#))
        .collect::<Vec<_>>()
        .join("\n");
    post_ok(s.addr, &t, &three).await;
    assert_eq!(
        collect(s.addr, &t, 3).await,
        vec![
            heartbeat_reply("1"),
            heartbeat_reply("2"),
            heartbeat_reply("3")
        ]
    );
}

#[tokio::test]
async fn a_post_over_max_post_bytes_is_413() {
    let mut c = config(300);
    c.longpoll.max_post_bytes = 1024;
    let s = start_with(c).await;
    let t = new_session(s.addr).await;

    // A heartbeat line padded to exactly `len` bytes.
    let line = |msg_ref: &str, len: usize| {
        let bare = format!(r#"[null,"{msg_ref}","phoenix","heartbeat",{{"pad":""}}]"#);
        let pad = "x".repeat(len - bare.len());
        let l = format!(r#"[null,"{msg_ref}","phoenix","heartbeat",{{"pad":"{pad}"}}]"#);
        assert_eq!(l.len(), len);
        l
    };
    let body = post(s.addr, &t, &line("1", 2000)).await;
    assert_eq!(body, json!({"status": 413}));
    let body = post(s.addr, &t, &line("2", 1025)).await;
    assert_eq!(body, json!({"status": 413}), "one byte over the limit");

    // At the limit: accepted; only this one is answered.
    post_ok(s.addr, &t, &line("3", 1024)).await;
    assert_eq!(collect(s.addr, &t, 1).await, vec![heartbeat_reply("3")]);
    let (body, _) = get_timed(s.addr, &t).await;
    assert_eq!(
        body["status"], 204,
        "the refused POSTs left no replies: {body}"
    );
}

#[tokio::test]
async fn malformed_lines_get_error_replies_and_the_valid_ones_still_run_in_order() {
    let s = start_with(config(300)).await;
    let t = new_session(s.addr).await;
    let body = [
        r#"[null,"1","phoenix","heartbeat",{}]"#,
        "not json",
        "[1,2]",
        "@@@",
        r#"[null,"2","phoenix","heartbeat",{}]"#,
    ]
    .join("\n");
    post_ok(s.addr, &t, &body).await;
    let f = collect(s.addr, &t, 5).await;
    assert_eq!(f[0], heartbeat_reply("1"));
    for (i, e) in f[1..4].iter().enumerate() {
        assert_eq!(e[1], Value::Null, "no ref to echo ({i}): {e}");
        assert!(e[2].is_string(), "{e}");
        assert_eq!(e[3], "phx_reply", "{e}");
        assert_eq!(e[4]["status"], "error", "{e}");
        assert!(
            e[4]["response"]["reason"]
                .as_str()
                .is_some_and(|r| !r.is_empty()),
            "{e}"
        );
    }
    assert_eq!(f[4], heartbeat_reply("2"));
    assert_eq!(
        metric(s.addr, "pushgate_bad_messages_total").await,
        Some(3.0)
    );
}

// 7 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_base64_line_is_a_binary_push() {
    use base64::Engine;
    let s = start_with(config(300)).await;
    let t = new_session(s.addr).await;
    join(s.addr, &t, "6", "room:lobby").await;

    // §2.3: kind 0, lengths 1,1,10,3, "6" "9" "room:lobby" "bin", payload ca fe.
    let mut frame = vec![0u8, 1, 1, 10, 3];
    frame.extend_from_slice(b"69room:lobbybin");
    frame.extend_from_slice(&[0xca, 0xfe]);
    let line = "AAEBCgM2OXJvb206bG9iYnliaW7K/g==";
    assert_eq!(
        base64::engine::general_purpose::STANDARD.encode(&frame),
        line
    );

    post_ok(s.addr, &t, line).await;
    let f = collect(s.addr, &t, 1).await;
    let r = &f[0];
    assert_eq!(r[0], "6", "{r}");
    assert_eq!(r[1], "9", "{r}");
    assert_eq!(r[2], "room:lobby", "{r}");
    assert_eq!(r[3], "phx_reply", "{r}");
    assert_eq!(r[4]["status"], "error", "{r}");
    assert!(r[4]["response"]["reason"].is_string(), "{r}");
}

// 8 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_expired_session_answers_500_to_get_and_410_to_post() {
    let mut c = config(300);
    c.longpoll.session_timeout_ms = 1500;
    let s = start_with(c).await;
    // Two clients poll a little, then go away: `t`'s last GET carried data (its join reply),
    // `idle`'s last GET waited out the window.
    let t = new_session(s.addr).await;
    let idle = new_session(s.addr).await;
    post_ok(s.addr, &t, &join_line("1", "room:x", "{}")).await;
    assert_eq!(s.app.hub.subscriber_count("room:x"), 1);
    let (body, _) = get_timed(s.addr, &idle).await;
    assert_eq!(body["status"], 204, "{body}");
    collect(s.addr, &t, 1).await;
    let last_poll = Instant::now();

    wait_metric(s.addr, "pushgate_longpoll_sessions_expired_total", 2.0).await;
    // The server stamps the poll just before answering it; allow for that gap.
    assert!(
        last_poll.elapsed() >= Duration::from_millis(1450),
        "expired before session_timeout_ms: {:?}",
        last_poll.elapsed()
    );
    let app = s.app.clone();
    wait_until(move || app.hub.subscriber_count("room:x") == 0).await;
    assert_eq!(
        metric(s.addr, r#"pushgate_connections{transport="longpoll"}"#).await,
        Some(0.0)
    );

    // One of our tokens whose session is gone: 500, so every client version reconnects.
    assert_eq!(get(s.addr, &t).await, json!({"status": 500}));
    assert_eq!(
        post(s.addr, &t, r#"[null,"2","phoenix","heartbeat",{}]"#).await,
        json!({"status": 410})
    );
    assert_eq!(get(s.addr, &idle).await, json!({"status": 500}));
    let never_issued = format!("lp{}", "0".repeat(32));
    assert_eq!(get(s.addr, &never_issued).await, json!({"status": 500}));

    // A token that is not ours (the user's param last): a new session.
    let body = lp(
        s.addr,
        "GET",
        "/socket/longpoll?vsn=2.0.0&token=user-secret",
        &[],
        b"",
    )
    .await;
    assert_eq!(body["status"], 410, "{body}");
    let fresh = body["token"].as_str().unwrap();
    assert!(is_our_token(fresh) && fresh != t, "{body}");
    assert_ne!(new_session(s.addr).await, t);
}

#[tokio::test]
async fn a_session_that_keeps_polling_does_not_expire() {
    let mut c = config(300);
    c.longpoll.session_timeout_ms = 1500;
    let s = start_with(c).await;
    let t = new_session(s.addr).await;
    post_ok(s.addr, &t, &join_line("1", "room:x", "{}")).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2600) {
        let body = get(s.addr, &t).await;
        assert!(
            body["status"] == 200 || body["status"] == 204,
            "a live session must stay: {body}"
        );
    }
    assert_eq!(
        metric(s.addr, "pushgate_longpoll_sessions_expired_total").await,
        Some(0.0)
    );
    assert_eq!(s.app.hub.subscriber_count("room:x"), 1);
    post_ok(s.addr, &t, r#"[null,"5","phoenix","heartbeat",{}]"#).await;
    assert_eq!(collect(s.addr, &t, 1).await, vec![heartbeat_reply("5")]);
}

// 9 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn options_is_a_cors_preflight_and_other_methods_are_400() {
    let s = start_with(config(300)).await;
    let (status, head, body) = http(
        s.addr,
        "OPTIONS",
        BASE,
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "content-type, x-phoenix-authtoken",
            ),
        ],
        b"",
    )
    .await;
    assert_eq!(status, 200, "{head}");
    assert!(body.is_empty(), "{:?}", String::from_utf8_lossy(&body));
    assert_eq!(
        header(&head, "access-control-allow-origin").as_deref(),
        Some("*")
    );
    assert_eq!(
        header(&head, "access-control-allow-headers").as_deref(),
        Some("accept, content-type, x-phoenix-authtoken"),
        "a fixed list: the headers phoenix.js sends (tests/origins.rs)"
    );
    assert_eq!(
        header(&head, "access-control-allow-methods").as_deref(),
        Some("GET, POST")
    );
    assert_eq!(
        header(&head, "access-control-max-age").as_deref(),
        Some("3600")
    );
    assert_eq!(
        metric(s.addr, r#"pushgate_connections{transport="longpoll"}"#).await,
        Some(0.0),
        "a preflight creates no session"
    );

    for method in ["PUT", "DELETE", "PATCH"] {
        let (status, head, _) = http(s.addr, method, BASE, &[], b"").await;
        assert_eq!(status, 400, "{method}: {head}");
    }
}

// 10 -----------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_message_is_lost_or_duplicated_across_polls() {
    const N: usize = 300;
    let s = start_with(config(300)).await;
    let t = new_session(s.addr).await;
    let joined_at = offset(&join(s.addr, &t, "6", "room:lobby").await);

    let addr = s.addr;
    let tt = t.clone();
    let poller = tokio::spawn(async move {
        let end = Instant::now() + Duration::from_secs(30);
        let mut got = Vec::new();
        let mut polls = 0;
        while got.len() < N {
            assert!(Instant::now() < end, "only {} of {N} broadcasts", got.len());
            let body = get(addr, &tt).await;
            polls += 1;
            match body["status"].as_u64() {
                Some(200) => got.extend(frames(&body)),
                Some(204) => {}
                _ => panic!("unexpected poll answer {body}"),
            }
        }
        (got, polls)
    });

    let mut published = Vec::new();
    let mut n = 0;
    let mut batch = 1;
    while n < N {
        if n % 2 == 0 {
            published.push(publish(s.addr, "room:lobby", "n", &format!(r#"{{"n":{n}}}"#)).await);
            n += 1;
        } else {
            let size = batch.min(N - n);
            let payloads: Vec<String> = (n..n + size).map(|i| format!(r#"{{"n":{i}}}"#)).collect();
            published.extend(publish_batch(s.addr, "room:lobby", "n", &payloads).await);
            n += size;
            batch = batch % 9 + 1;
        }
    }
    let (got, polls) = tokio::time::timeout(Duration::from_secs(40), poller)
        .await
        .expect("poller timed out")
        .unwrap();
    assert_eq!(got.len(), N, "{got:?}");
    for (i, f) in got.iter().enumerate() {
        assert_eq!(f[0], Value::Null, "{f}");
        assert_eq!(
            f[1],
            published[i].as_str(),
            "broadcast {i} out of order: {f}"
        );
        assert_eq!(
            offset(f[1].as_str().unwrap()),
            joined_at + 1 + i as u64,
            "{f}"
        );
        assert_eq!(f[2], "room:lobby");
        assert_eq!(f[3], "n");
        assert_eq!(f[4], json!({"n": i}), "{f}");
    }
    assert!(
        polls >= 2,
        "expected the messages spread over several polls"
    );
    // Nothing more is waiting.
    let body = get(s.addr, &t).await;
    assert_eq!(body["status"], 204, "{body}");
    assert_eq!(
        metric(
            s.addr,
            r#"pushgate_messages_delivered_total{transport="longpoll"}"#
        )
        .await,
        Some(N as f64)
    );
}

// 11 -----------------------------------------------------------------------------------------

#[tokio::test]
async fn a_session_that_falls_off_history_is_closed_and_recovers_by_position() {
    let mut c = config(300);
    c.history.size = 20;
    let s = start_with(c).await;
    let t = new_session(s.addr).await;
    let seen = join(s.addr, &t, "1", "room:x").await;
    let (epoch, _) = split_position(&seen);

    let payloads: Vec<String> = (0..100).map(|i| format!(r#"{{"n":{i}}}"#)).collect();
    let positions = publish_batch(s.addr, "room:x", "n", &payloads).await;
    assert_eq!(positions.len(), 100);

    assert_eq!(get(s.addr, &t).await, json!({"status": 500}));
    assert_eq!(
        metric(
            s.addr,
            r#"pushgate_slow_consumer_closes_total{transport="longpoll"}"#
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(s.addr, r#"pushgate_connections{transport="longpoll"}"#).await,
        Some(0.0)
    );
    let app = s.app.clone();
    wait_until(move || app.hub.subscriber_count("room:x") == 0).await;
    // The session is gone.
    assert_eq!(get(s.addr, &t).await, json!({"status": 500}));
    assert_eq!(
        post(s.addr, &t, r#"[null,"2","phoenix","heartbeat",{}]"#).await,
        json!({"status": 410})
    );

    // The client reconnects and rejoins from the last position it saw: no longer in history.
    let t2 = new_session(s.addr).await;
    assert_ne!(t2, t);
    post_ok(
        s.addr,
        &t2,
        &join_line("2", "room:x", &json!({"since": seen}).to_string()),
    )
    .await;
    let f = collect(s.addr, &t2, 1).await;
    let r = assert_join_ok(&f[0], "2", "room:x");
    assert_eq!(r["recovered"], false, "{r}");
    assert_eq!(r["position"], format!("{epoch}:100"), "{r}");

    // A position the history still covers replays the rest, once, after the join reply.
    let since = format!("{epoch}:95");
    post_ok(
        s.addr,
        &t2,
        &join_line("3", "room:x", &json!({"since": since}).to_string()),
    )
    .await;
    let f = collect(s.addr, &t2, 1 + 1 + 5).await;
    assert_eq!(f[0], json!(["2", "2", "room:x", "phx_close", {}]));
    let r = assert_join_ok(&f[1], "3", "room:x");
    assert_eq!(r["recovered"], true, "{r}");
    for (k, b) in f[2..].iter().enumerate() {
        let n = 95 + k;
        assert_eq!(
            b,
            &json!([null, positions[n], "room:x", "n", {"n": n}]),
            "replayed broadcast {k}"
        );
    }
    let (body, _) = get_timed(s.addr, &t2).await;
    assert_eq!(body["status"], 204, "nothing replayed twice: {body}");
}

// 12 -----------------------------------------------------------------------------------------

#[tokio::test]
async fn a_disabled_longpoll_transport_is_404() {
    let mut c = config(300);
    c.longpoll.enabled = false;
    let s = start_with(c).await;
    for method in ["GET", "POST"] {
        let (status, head, body) = http(s.addr, method, BASE, &[], b"").await;
        assert_eq!(status, 404, "{method}: {head}");
        assert!(
            header(&head, "content-type").is_some_and(|v| v.starts_with("application/json")),
            "{head}"
        );
        let v: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("404 body is not JSON ({e}): {body:?}"));
        assert!(v.is_object(), "{v}");
    }
    assert_eq!(
        metric(s.addr, r#"pushgate_connections{transport="longpoll"}"#).await,
        Some(0.0)
    );
}

// 13 -----------------------------------------------------------------------------------------

#[tokio::test]
async fn shutdown_answers_a_held_get_with_500_at_once() {
    let s = start_with(config(4000)).await;
    let t = new_session(s.addr).await;
    let addr = s.addr;
    let tt = t.clone();
    let held = tokio::spawn(async move { get(addr, &tt).await });
    until_held(&s, &t).await;
    assert!(!held.is_finished(), "the GET must be held");

    let t0 = Instant::now();
    s.stop.cancel();
    let body = tokio::time::timeout(DEADLINE, held).await.unwrap().unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "a held GET must not wait out its window on shutdown: {:?}",
        t0.elapsed()
    );
    assert_eq!(body, json!({"status": 500}));
    let clean = tokio::time::timeout(DEADLINE, s.handle)
        .await
        .expect("server did not stop")
        .unwrap();
    assert!(clean, "every task must end within the grace period");
}

// Limits shared with the WebSocket transport -----------------------------------------------

#[tokio::test]
async fn the_topic_limit_applies_to_a_longpoll_session() {
    let mut c = config(300);
    c.limits.max_topics_per_connection = 2;
    let s = start_with(c).await;
    let t = new_session(s.addr).await;
    let body = [
        join_line("1", "room:a", "{}"),
        join_line("2", "room:b", "{}"),
        join_line("3", "room:c", "{}"),
    ]
    .join("\n");
    post_ok(s.addr, &t, &body).await;
    let f = collect(s.addr, &t, 3).await;
    assert_join_ok(&f[0], "1", "room:a");
    assert_join_ok(&f[1], "2", "room:b");
    assert_eq!(f[2][0], "3", "{}", f[2]);
    assert_eq!(f[2][1], "3", "{}", f[2]);
    assert_eq!(f[2][2], "room:c", "{}", f[2]);
    assert_eq!(f[2][4]["status"], "error", "{}", f[2]);
    assert_eq!(s.app.hub.subscriber_count("room:c"), 0);
}

#[tokio::test]
async fn a_line_over_max_frame_bytes_gets_an_error_reply() {
    let mut c = config(300);
    c.limits.max_frame_bytes = 1024;
    let s = start_with(c).await;
    let t = new_session(s.addr).await;
    let big = format!(
        r#"[null,"1","phoenix","heartbeat",{{"pad":"{}"}}]"#,
        "x".repeat(2000)
    );
    post_ok(
        s.addr,
        &t,
        &format!("{big}\n[null,\"2\",\"phoenix\",\"heartbeat\",{{}}]"),
    )
    .await;
    let f = collect(s.addr, &t, 2).await;
    assert_eq!(f[0][3], "phx_reply", "{}", f[0]);
    assert_eq!(f[0][4]["status"], "error", "{}", f[0]);
    assert_eq!(f[1], heartbeat_reply("2"));
}

/// Broadcasts waiting past `limits.max_pending_bytes` make the session a slow consumer, like a
/// WebSocket that does not read.
#[tokio::test]
async fn too_many_pending_broadcast_bytes_close_the_session() {
    let mut c = config(300);
    c.limits.max_pending_bytes = 65536;
    let s = start_with(c).await;
    let t = new_session(s.addr).await;
    join(s.addr, &t, "1", "room:x").await;
    let big = format!(r#"{{"s":"{}"}}"#, "y".repeat(30_000));
    for _ in 0..3 {
        publish(s.addr, "room:x", "big", &big).await;
    }
    assert_eq!(get(s.addr, &t).await, json!({"status": 500}));
    assert_eq!(
        metric(
            s.addr,
            r#"pushgate_slow_consumer_closes_total{transport="longpoll"}"#
        )
        .await,
        Some(1.0)
    );
    let app = s.app.clone();
    wait_until(move || app.hub.subscriber_count("room:x") == 0).await;
    assert_eq!(get(s.addr, &t).await, json!({"status": 500}));
}

/// A client that posts but never polls: its replies pile up in the session, up to
/// `limits.max_pending_bytes`; then the session ends and the POST is refused.
#[tokio::test]
async fn replies_piling_up_unpolled_end_the_session() {
    let mut c = config(300);
    c.limits.max_pending_bytes = 65536;
    let s = start_with(c).await;
    let t = new_session(s.addr).await;
    // Each heartbeat reply echoes its 255-byte ref (the most a ref may have): about 310 bytes
    // a line, 31 KB a POST of 100 lines.
    let lines = |from: usize| {
        (from..from + 100)
            .map(|i| format!(r#"[null,"{i:0255}","phoenix","heartbeat",{{}}]"#))
            .collect::<Vec<_>>()
            .join("\n")
    };
    post_ok(s.addr, &t, &lines(0)).await;
    post_ok(s.addr, &t, &lines(100)).await;
    assert_eq!(post(s.addr, &t, &lines(200)).await, json!({"status": 410}));
    assert_eq!(
        metric(
            s.addr,
            r#"pushgate_slow_consumer_closes_total{transport="longpoll"}"#
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(s.addr, r#"pushgate_connections{transport="longpoll"}"#).await,
        Some(0.0)
    );
    assert_eq!(get(s.addr, &t).await, json!({"status": 500}));
}

/// A backlog far larger than one response is delivered over consecutive polls, in order.
#[tokio::test]
async fn a_large_backlog_arrives_whole_and_in_order_over_several_polls() {
    let s = start_with(config(300)).await;
    let t = new_session(s.addr).await;
    let at = offset(&join(s.addr, &t, "1", "room:big").await);
    let mut positions = Vec::new();
    for i in 0..12 {
        let payload = format!(r#"{{"i":{i},"s":"{}"}}"#, "z".repeat(100_000));
        positions.push(publish(s.addr, "room:big", "big", &payload).await);
    }
    let f = collect(s.addr, &t, 12).await;
    for (i, b) in f.iter().enumerate() {
        assert_eq!(b[1], positions[i].as_str(), "{i}");
        assert_eq!(offset(&positions[i]), at + 1 + i as u64);
        assert_eq!(b[4]["i"], i, "{i}");
        assert_eq!(b[4]["s"].as_str().map(str::len), Some(100_000));
    }
}

/// phoenix.js `disconnect()` and a closed tab abort the held GET: the TCP connection closes
/// while the server is holding the poll. The session must still expire.
#[tokio::test]
async fn a_session_whose_held_get_was_aborted_still_expires() {
    use tokio::io::AsyncWriteExt;
    let mut c = config(300);
    c.longpoll.session_timeout_ms = 1500;
    let s = start_with(c).await;
    let t = new_session(s.addr).await;
    join(s.addr, &t, "1", "room:x").await;

    let mut conn = tokio::time::timeout(DEADLINE, tokio::net::TcpStream::connect(s.addr))
        .await
        .expect("connect timed out")
        .unwrap();
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n\r\n",
        url(&t),
        s.addr
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    // Let the server take the GET and hold it (it has no signal for that), then go away.
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(conn);

    wait_metric(s.addr, "pushgate_longpoll_sessions_expired_total", 1.0).await;
    let app = s.app.clone();
    wait_until(move || app.hub.subscriber_count("room:x") == 0).await;
    assert_eq!(get(s.addr, &t).await, json!({"status": 500}));
}

// Sessions hold connection slots ------------------------------------------------------------

/// `n` session-creating GETs, one after another on one keep-alive connection (the flood of
/// issue 16: 48,000 of them took half a second). Returns the answers and the open connection.
async fn session_flood(addr: SocketAddr, n: usize) -> (Vec<Value>, tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {BASE} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n");
    let mut answers = Vec::new();
    for _ in 0..n {
        conn.write_all(req.as_bytes()).await.unwrap();
        let (status, head, body) = read_response(&mut conn).await.expect("flood answer");
        assert_eq!(status, 200, "{head}");
        answers.push(serde_json::from_slice(&body).expect("a JSON answer"));
    }
    (answers, conn)
}

/// Every client holds a slot of `server.max_connections`: a WebSocket its socket's, a LongPoll
/// session one of its own (and each TCP connection its own). A session past the limit is
/// refused with `{"status":500}` (phoenix.js 1.7 and 1.8 reconnect with backoff), with a
/// reason, and counted.
#[tokio::test]
async fn longpoll_sessions_and_websockets_share_server_max_connections() {
    let mut c = config(300);
    c.server.max_connections = 10;
    let s = start_with(c).await;
    let mut sockets = Vec::new();
    for _ in 0..3 {
        sockets.push(connect(s.addr).await);
    }
    // 10 slots: 3 WebSockets, the flood's own connection, the next connection's (the accept
    // loop takes a slot before it accepts), so 5 sessions.
    let (answers, conn) = session_flood(s.addr, 40).await;
    let created = answers.iter().filter(|a| a["status"] == 410).count();
    assert_eq!(created, 5, "sessions created: {answers:?}");
    for a in &answers[5..] {
        assert_eq!(a["status"], 500, "a refused session: {a}");
        let reason = a["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("server.max_connections"), "{a}");
    }
    drop(conn);
    assert_eq!(
        metric(s.addr, r#"pushgate_refusals_total{cause="session_cap"}"#).await,
        Some(35.0)
    );
    // The WebSockets are unaffected.
    support::join(&mut sockets[0], "1", "room:ws", "{}").await;
}

/// A session that was created and never polled is gone within seconds (not after
/// `longpoll.session_timeout_ms`), so a flood of session-creating GETs fills the table only
/// briefly: a legitimate client then gets a session and its messages. A session that polled is
/// kept.
#[tokio::test]
async fn never_polled_sessions_go_away_within_seconds_and_a_new_client_gets_a_session() {
    let mut c = config(300);
    c.server.max_connections = 20;
    let s = start_with(c).await;
    assert_eq!(c_timeout(&s), 30_000, "the default session timeout");
    let polled = new_session(s.addr).await;
    assert_eq!(get(s.addr, &polled).await["status"], 204);

    let t0 = Instant::now();
    let (answers, conn) = session_flood(s.addr, 100).await;
    assert!(
        answers.iter().any(|a| a["status"] == 500),
        "the table filled"
    );
    drop(conn);
    // Only the session that polled remains, well before the session timeout.
    wait_metric(s.addr, r#"pushgate_connections{transport="longpoll"}"#, 1.0).await;
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "never-polled sessions lingered {:?}",
        t0.elapsed()
    );

    // A new client gets a session and receives messages; the polled session still works.
    let t = new_session(s.addr).await;
    join(s.addr, &t, "1", "room:x").await;
    join(s.addr, &polled, "1", "room:x").await;
    let pos = publish(s.addr, "room:x", "hello", r#"{"n":1}"#).await;
    for token in [&t, &polled] {
        let f = collect(s.addr, token, 1).await;
        assert_eq!(f[0][1], pos.as_str(), "{}", f[0]);
        assert_eq!(f[0][3], "hello", "{}", f[0]);
    }
}

fn c_timeout(s: &TestServer) -> u64 {
    s.app.config.longpoll.session_timeout_ms
}

// Acknowledgements --------------------------------------------------------------------------

/// The token a poll answer carries, and the frames in it.
fn answered(body: &Value) -> (String, Vec<Value>) {
    let t = body["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token in {body}"))
        .to_string();
    (t, frames(body))
}

/// A poll answer the client never got (a balancer retried the request elsewhere, a relaying
/// node died): the client's next poll carries the token of the answer before, and gets the same
/// frames again, under the same positions, before anything newer. A poll with the token of the
/// last answer acknowledges it: those frames never come again. (Before the acknowledgements, a
/// frame left the session when an answer carried it, and the retried poll went on after it.)
#[tokio::test]
async fn an_answer_the_client_never_got_is_sent_again_until_acknowledged() {
    let s = start_with(config(300)).await;
    let t = new_session(s.addr).await;
    post_ok(s.addr, &t, &join_line("1", "room:ack", "{}")).await;
    let (t1, f) = answered(&get(s.addr, &t).await);
    assert_join_ok(&f[0], "1", "room:ack");
    assert_eq!(
        t1.len(),
        42,
        "an answer's token: the session's and 8 hex digits: {t1}"
    );
    assert!(t1.starts_with(&t), "{t1}");

    let p1 = publish(s.addr, "room:ack", "n", "1").await;
    let p2 = publish(s.addr, "room:ack", "n", "2").await;
    let first = get(s.addr, &t1).await;
    let (t2, f) = answered(&first);
    let expected = vec![
        json!([null, p1, "room:ack", "n", 1]),
        json!([null, p2, "room:ack", "n", 2]),
    ];
    assert_eq!(f, expected, "{first}");
    assert_ne!(t2, t1);

    // That answer is lost: the client polls again with the token it had.
    let again = get(s.addr, &t1).await;
    assert_eq!(again, first, "the lost answer, exactly, again");
    wait_metric(s.addr, "pushgate_longpoll_frames_resent_total", 2.0).await;

    // Now it got it: nothing of it comes again; the next message does.
    let p3 = publish(s.addr, "room:ack", "n", "3").await;
    let (t3, f) = answered(&get(s.addr, &t2).await);
    assert_eq!(f, vec![json!([null, p3, "room:ack", "n", 3])]);
    // A stale poll (an acknowledged token) gets nothing already acknowledged.
    let stale = get(s.addr, &t1).await;
    assert_eq!(stale["status"], 200, "{stale}");
    assert_eq!(
        frames(&stale),
        vec![json!([null, p3, "room:ack", "n", 3])],
        "only the unacknowledged"
    );
    let idle = get(s.addr, &t3).await;
    assert_eq!(idle["status"], 204, "{idle}");
    assert_eq!(
        idle["token"], t3,
        "an empty answer keeps the client's acknowledgement"
    );
    wait_metric(s.addr, "pushgate_longpoll_frames_resent_total", 3.0).await;
}
