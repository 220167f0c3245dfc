//! Bad input over WebSocket: every case gets an error reply or the close code it deserves,
//! never a panic, and the connection's other topics keep working wherever the protocol allows.
//! Frames no client library would send go over a raw TcpStream ([`RawWs`]).

mod support;

use futures_util::SinkExt;
use serde_json::Value;
use support::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Asserts `r` is an error `phx_reply` with `msg_ref` and `topic`; returns the reason.
#[track_caller]
fn assert_error_reply(r: &Value, msg_ref: Option<&str>, topic: &str) -> String {
    assert_eq!(r.as_array().map(Vec::len), Some(5), "reply shape: {r}");
    match msg_ref {
        Some(m) => assert_eq!(r[1], m, "ref echoed as a string: {r}"),
        None => assert_eq!(r[1], Value::Null, "ref: {r}"),
    }
    assert_eq!(r[2], topic, "topic: {r}");
    assert_eq!(r[3], "phx_reply", "{r}");
    assert_eq!(r[4]["status"], "error", "{r}");
    r[4]["response"]["reason"]
        .as_str()
        .unwrap_or_else(|| panic!("response.reason must be a string: {r}"))
        .to_string()
}

/// A joined `topic` still delivers a fresh broadcast, and a heartbeat is still answered.
async fn still_works(ws: &mut Ws, s: &TestServer, topic: &str, heartbeat_ref: &str) {
    let pos = publish(s.addr, topic, "still_here", r#"{"ok":true}"#).await;
    let m = recv(ws).await;
    assert_eq!(m[0], Value::Null, "{m}");
    assert_eq!(m[1], pos.as_str(), "{m}");
    assert_eq!(m[2], topic, "{m}");
    assert_eq!(m[3], "still_here", "{m}");
    send(
        ws,
        &format!(r#"[null,"{heartbeat_ref}","phoenix","heartbeat",{{}}]"#),
    )
    .await;
    let r = recv(ws).await;
    assert_eq!(
        r.to_string(),
        format!(
            r#"[null,"{heartbeat_ref}","phoenix","phx_reply",{{"response":{{}},"status":"ok"}}]"#
        )
    );
}

/// The raw-socket version of [`still_works`]: the heartbeat is answered.
async fn raw_heartbeat(ws: &mut RawWs, heartbeat_ref: &str) {
    ws.send_text(&format!(
        r#"[null,"{heartbeat_ref}","phoenix","heartbeat",{{}}]"#
    ))
    .await;
    let r = ws.recv_json().await;
    assert_eq!(r[1], heartbeat_ref, "{r}");
    assert_eq!(r[4]["status"], "ok", "{r}");
}

fn no_server_panics() {
    assert_eq!(
        server_panics(),
        0,
        "the server panicked (see the test output)"
    );
}

#[tokio::test]
async fn malformed_json_gets_an_error_reply_on_phoenix_and_the_connection_keeps_working() {
    install_panic_counter();
    let s = start().await;
    let mut ws = connect(s.addr).await;
    join(&mut ws, "1", "room:a", "{}").await;

    send(&mut ws, "not json").await;
    let r = recv(&mut ws).await;
    assert_eq!(r[0], Value::Null, "{r}");
    let reason = assert_error_reply(&r, None, "phoenix");
    assert!(!reason.is_empty());

    // Other text that is JSON but not a message array.
    for bad in [
        r#"{"topic":"room:a"}"#,
        "[]",
        "null",
        "42",
        r#""a string""#,
        "",
        "[",
        "[null,\"5\",\"room:a\",\"ev\",{}] trailing",
    ] {
        send(&mut ws, bad).await;
        let r = recv(&mut ws).await;
        assert_eq!(r[3], "phx_reply", "for {bad:?}: {r}");
        assert_eq!(r[4]["status"], "error", "for {bad:?}: {r}");
        assert!(r[4]["response"]["reason"].is_string(), "for {bad:?}: {r}");
    }

    still_works(&mut ws, &s, "room:a", "90").await;
    no_server_panics();
}

#[tokio::test]
async fn wrong_arity_echoes_the_recoverable_ref_and_topic() {
    install_panic_counter();
    let s = start().await;
    let mut ws = connect(s.addr).await;
    join(&mut ws, "1", "room:a", "{}").await;

    send(&mut ws, r#"["1","2","room:a"]"#).await;
    let r = recv(&mut ws).await;
    let reason = assert_error_reply(&r, Some("2"), "room:a");
    assert!(
        reason.contains('5') || reason.contains("elements"),
        "{reason}"
    );

    // Without a topic the reply goes to "phoenix", still with the ref.
    send(&mut ws, r#"[null,"3"]"#).await;
    let r = recv(&mut ws).await;
    assert_error_reply(&r, Some("3"), "phoenix");

    // Four elements: the event is there but the payload is missing.
    send(&mut ws, r#"["1","4","room:a","shout"]"#).await;
    let r = recv(&mut ws).await;
    assert_error_reply(&r, Some("4"), "room:a");

    still_works(&mut ws, &s, "room:a", "91").await;
    no_server_panics();
}

#[tokio::test]
async fn non_string_ref_topic_event_or_join_ref_get_an_error_reply() {
    install_panic_counter();
    let s = start().await;
    let mut ws = connect(s.addr).await;
    join(&mut ws, "1", "room:a", "{}").await;

    // A numeric ref: it cannot be echoed as the number (phoenix.js compares with ===).
    send(&mut ws, r#"["1",2,"room:a","ev",{}]"#).await;
    let r = recv(&mut ws).await;
    assert!(
        r[1].is_null() || r[1] == "2",
        "ref must never be a number: {r}"
    );
    assert_eq!(r[2], "room:a", "{r}");
    assert_eq!(r[4]["status"], "error", "{r}");
    let reason = r[4]["response"]["reason"].as_str().unwrap();
    assert!(reason.contains("ref"), "reason mentions the ref: {reason}");

    // A non-string topic: the reply goes to "phoenix" and names the topic.
    send(&mut ws, r#"["1","3",3,"ev",{}]"#).await;
    let r = recv(&mut ws).await;
    let reason = assert_error_reply(&r, Some("3"), "phoenix");
    assert!(reason.contains("topic"), "{reason}");

    // A non-string event.
    send(&mut ws, r#"["1","4","room:a",4,{}]"#).await;
    let r = recv(&mut ws).await;
    let reason = assert_error_reply(&r, Some("4"), "room:a");
    assert!(reason.contains("event"), "{reason}");

    // A numeric join_ref.
    send(&mut ws, r#"[1,"5","room:a","ev",{}]"#).await;
    let r = recv(&mut ws).await;
    let reason = assert_error_reply(&r, Some("5"), "room:a");
    assert!(reason.contains("join_ref"), "{reason}");

    // A join whose ref is a number must not join.
    send(&mut ws, r#"["6",6,"room:numeric","phx_join",{}]"#).await;
    let r = recv(&mut ws).await;
    assert_eq!(r[4]["status"], "error", "{r}");
    assert_eq!(s.app.hub.subscriber_count("room:numeric"), 0);

    still_works(&mut ws, &s, "room:a", "92").await;
    no_server_panics();
}

#[tokio::test]
async fn a_frame_over_the_limit_closes_with_1009_and_one_at_the_limit_is_fine() {
    install_panic_counter();
    let mut c = test_config();
    c.limits.max_frame_bytes = 2048;
    let s = start_with(c).await;

    // Exactly 2048 bytes is allowed.
    let mut ws = connect(s.addr).await;
    let head = r#"[null,"1","phoenix","heartbeat",{"pad":""#;
    let tail = r#""}]"#;
    let text = format!("{head}{}{tail}", "x".repeat(2048 - head.len() - tail.len()));
    assert_eq!(text.len(), 2048);
    send(&mut ws, &text).await;
    assert_eq!(recv(&mut ws).await[1], "1");

    // 4 KiB is not.
    let big = format!(
        r#"[null,"2","phoenix","heartbeat",{{"pad":"{}"}}]"#,
        "x".repeat(4096)
    );
    send(&mut ws, &big).await;
    assert_eq!(recv_close(&mut ws).await, 1009);

    // A header that declares a huge frame is refused before any of it arrives.
    let mut raw = raw_connect(s.addr).await;
    let mut frame = vec![0x81, 0x80 | 127];
    frame.extend_from_slice(&(1u64 << 40).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    raw.send_bytes(&frame).await.unwrap();
    assert_eq!(raw.recv_close().await, 1009);
    raw.expect_eof().await;
    no_server_panics();
}

#[tokio::test]
async fn a_fragmented_message_over_the_limit_closes_with_1009() {
    install_panic_counter();
    let mut c = test_config();
    c.limits.max_frame_bytes = 2048;
    let s = start_with(c).await;

    // Each fragment is under the limit; together they are not.
    let mut raw = raw_connect(s.addr).await;
    let text = format!(
        r#"[null,"1","phoenix","heartbeat",{{"pad":"{}"}}]"#,
        "x".repeat(3000)
    );
    let (a, b) = text.as_bytes().split_at(1500);
    raw.send_frame(false, OP_TEXT, a).await;
    let _ = raw
        .send_bytes(&client_frame(true, OP_CONTINUATION, b, true))
        .await;
    assert_eq!(raw.recv_close().await, 1009);
    raw.expect_eof().await;

    // Under the limit, fragments are reassembled, also when a UTF-8 character is split across
    // them, and a ping in the middle of a fragmented message is answered.
    let mut raw = raw_connect(s.addr).await;
    let text = r#"[null,"7","phoenix","heartbeat",{"name":"José"}]"#.as_bytes();
    let split = text.iter().position(|&b| b == 0xc3).unwrap() + 1; // inside "é"
    raw.send_frame(false, OP_TEXT, &text[..10]).await;
    raw.send_frame(true, OP_PING, b"mid").await;
    raw.send_frame(false, OP_CONTINUATION, &text[10..split])
        .await;
    raw.send_frame(true, OP_CONTINUATION, &text[split..]).await;
    match raw.next_event().await {
        RawEvent::Frame {
            fin: true,
            opcode: OP_PONG,
            payload,
        } => assert_eq!(payload, b"mid"),
        other => panic!("expected the pong first, got {other:?}"),
    }
    let r = raw.recv_json().await;
    assert_eq!(r[1], "7", "{r}");
    no_server_panics();
}

#[tokio::test]
async fn websocket_protocol_violations_get_their_close_codes() {
    install_panic_counter();
    let s = start().await;
    let text = br#"[null,"1","phoenix","heartbeat",{}]"#;

    // (what, bytes, expected close code)
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "invalid UTF-8 in a text frame",
            client_frame(true, OP_TEXT, &[b'[', 0xff, 0xfe, b']'], true),
            1007,
        ),
        (
            "an unmasked client frame",
            client_frame(true, OP_TEXT, text, false),
            1002,
        ),
        ("unknown opcode 3", client_frame(true, 0x3, b"", true), 1002),
        (
            "unknown control opcode 0xB",
            client_frame(true, 0xB, b"", true),
            1002,
        ),
        (
            "reserved bit set",
            {
                let mut f = client_frame(true, OP_TEXT, text, true);
                f[0] |= 0x40;
                f
            },
            1002,
        ),
        (
            "continuation without a message",
            client_frame(true, OP_CONTINUATION, b"x", true),
            1002,
        ),
        (
            "fragmented ping",
            client_frame(false, OP_PING, b"", true),
            1002,
        ),
        (
            "ping longer than 125 bytes",
            client_frame(true, OP_PING, &[0u8; 126], true),
            1002,
        ),
        (
            "new text message inside a fragmented one",
            [
                client_frame(false, OP_TEXT, b"[", true),
                client_frame(true, OP_TEXT, text, true),
            ]
            .concat(),
            1002,
        ),
        (
            "close frame with a one-byte payload",
            client_frame(true, OP_CLOSE, &[3], true),
            1002,
        ),
        (
            "close frame with an invalid code (999)",
            client_frame(true, OP_CLOSE, &999u16.to_be_bytes(), true),
            1002,
        ),
        (
            "close frame whose reason is not UTF-8",
            client_frame(true, OP_CLOSE, &[0x03, 0xe8, 0xff], true),
            1007,
        ),
        (
            "64-bit length with the high bit set",
            {
                let mut f = vec![0x81, 0x80 | 127];
                f.extend_from_slice(&u64::MAX.to_be_bytes());
                f.extend_from_slice(&[1, 2, 3, 4]);
                f
            },
            1002,
        ),
    ];
    for (what, bytes, want) in cases {
        let mut raw = raw_connect(s.addr).await;
        // A good message first: the connection works until the violation.
        raw_heartbeat(&mut raw, "0").await;
        let _ = raw.send_bytes(&bytes).await;
        let code = raw.recv_close().await;
        assert_eq!(code, want, "{what}");
        raw.expect_eof().await;
    }
    // The server still serves.
    let (status, _, _) = http(s.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(status, 200);
    no_server_panics();
}

#[tokio::test]
async fn an_unknown_event_on_a_joined_topic_gets_an_error_reply_and_the_topic_keeps_delivering() {
    install_panic_counter();
    let s = start().await;
    let mut ws = connect(s.addr).await;
    join(&mut ws, "6", "room:a", "{}").await;
    join(&mut ws, "8", "room:b", "{}").await;
    for (i, ev) in ["no_such_event", "phx_reply", "phx_error", "heartbeat"]
        .iter()
        .enumerate()
    {
        let msg_ref = (20 + i).to_string();
        send(
            &mut ws,
            &format!(r#"["6","{msg_ref}","room:a","{ev}",{{}}]"#),
        )
        .await;
        let r = recv(&mut ws).await;
        assert_eq!(r[0], "6", "join_ref echoed for {ev}: {r}");
        assert_error_reply(&r, Some(&msg_ref), "room:a");
    }
    still_works(&mut ws, &s, "room:a", "93").await;
    still_works(&mut ws, &s, "room:b", "94").await;
    no_server_panics();
}

#[tokio::test]
async fn joins_beyond_the_topic_limit_are_refused_and_the_others_keep_delivering() {
    install_panic_counter();
    let mut c = test_config();
    c.limits.max_topics_per_connection = 3;
    let s = start_with(c).await;
    let mut ws = connect(s.addr).await;
    for i in 1..=3 {
        join(&mut ws, &i.to_string(), &format!("room:{i}"), "{}").await;
    }
    send(&mut ws, r#"["4","4","room:4","phx_join",{}]"#).await;
    let r = recv(&mut ws).await;
    assert_eq!(r[0], "4", "{r}");
    assert_error_reply(&r, Some("4"), "room:4");
    assert_eq!(s.app.hub.subscriber_count("room:4"), 0);

    // Rejoining a topic that is already joined is not a fourth topic.
    send(&mut ws, r#"["5","5","room:1","phx_join",{}]"#).await;
    assert_eq!(
        recv(&mut ws).await.to_string(),
        r#"["1","1","room:1","phx_close",{}]"#
    );
    let r = recv(&mut ws).await;
    assert_eq!(r[1], "5");
    assert_eq!(r[4]["status"], "ok", "{r}");

    // The three joined topics keep delivering.
    let mut want = Vec::new();
    for i in 1..=3 {
        want.push(publish(s.addr, &format!("room:{i}"), "e", &i.to_string()).await);
    }
    let mut got = Vec::new();
    for _ in 1..=3 {
        let m = recv(&mut ws).await;
        assert_eq!(m[2], format!("room:{}", m[4]), "{m}");
        got.push(m[1].as_str().unwrap().to_string());
    }
    got.sort();
    want.sort();
    assert_eq!(got, want);

    // After leaving one, a new join succeeds and delivers.
    send(&mut ws, r#"["2","6","room:2","phx_leave",{}]"#).await;
    assert_eq!(recv(&mut ws).await[4]["status"], "ok");
    assert_eq!(recv(&mut ws).await[3], "phx_close");
    join(&mut ws, "7", "room:4", "{}").await;
    still_works(&mut ws, &s, "room:4", "95").await;
    assert_eq!(
        metric_sum(s.addr, "pushgate_join_errors_total").await,
        Some(1.0)
    );
    no_server_panics();
}

#[tokio::test]
async fn invalid_join_params_and_topics_get_an_error_reply() {
    install_panic_counter();
    let s = start().await;
    let mut ws = connect(s.addr).await;
    join(&mut ws, "1", "room:ok", "{}").await;
    let long_topic = format!("room:{}", "x".repeat(300));
    let cases: Vec<(String, String)> = vec![
        ("room:p1".into(), "[1,2]".into()),
        ("room:p2".into(), r#"{"since":5}"#.into()),
        ("room:p3".into(), r#"{"since":["a:1"]}"#.into()),
        ("room:p4".into(), r#""params""#.into()),
        ("room:p5".into(), "5".into()),
        ("phoenix".into(), "{}".into()),
        (String::new(), "{}".into()),
        (long_topic, "{}".into()),
    ];
    for (i, (topic, params)) in cases.iter().enumerate() {
        let r#ref = (10 + i).to_string();
        send(
            &mut ws,
            &format!(r#"["{ref}","{ref}","{topic}","phx_join",{params}]"#),
        )
        .await;
        let r = recv(&mut ws).await;
        assert_eq!(
            r[4]["status"], "error",
            "join of {topic:?} with {params}: {r}"
        );
        assert_eq!(r[1], r#ref.as_str(), "{r}");
        assert_eq!(r[2], topic.as_str(), "{r}");
        assert!(r[4]["response"]["reason"].is_string(), "{r}");
        assert_eq!(
            s.app.hub.subscriber_count(topic),
            0,
            "{topic:?} must not be joined"
        );
    }
    assert_eq!(
        metric_sum(s.addr, "pushgate_join_errors_total").await,
        Some(cases.len() as f64)
    );
    still_works(&mut ws, &s, "room:ok", "96").await;
    no_server_panics();
}

#[tokio::test]
async fn a_client_close_is_echoed_and_the_server_never_sends_1000_itself() {
    install_panic_counter();
    let s = start().await;

    // The client closes with 1000: the server answers with a close frame, then ends TCP.
    let mut ws = connect(s.addr).await;
    join(&mut ws, "1", "room:a", "{}").await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    let echoed = recv_close_then_end(&mut ws).await;
    // The client's own code comes back (RFC 6455 §5.5.1; README, "Close codes").
    assert_eq!(echoed, 1000, "the client's 1000 must be echoed");
    // So does an application's own code.
    let mut ws = connect(s.addr).await;
    join(&mut ws, "1", "room:a", "{}").await;
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4001),
        reason: "app".into(),
    }))
    .await
    .unwrap();
    assert_eq!(
        recv_close_then_end(&mut ws).await,
        4001,
        "4001 must be echoed"
    );

    // The client closes without a code: the answer has none either (the client sees 1005), so
    // the server never picks 1000 on its own.
    let mut ws = connect(s.addr).await;
    ws.close(None).await.unwrap();
    let code = recv_close_then_end(&mut ws).await;
    assert_eq!(
        code, 1005,
        "the answer to a close without a code carries none"
    );

    // Raw: a close with 1001 and a reason is answered, and nothing follows it.
    let mut raw = raw_connect(s.addr).await;
    raw.send_frame(true, OP_CLOSE, &[0x03, 0xe9, b'o', b'k'])
        .await;
    let code = raw.recv_close().await;
    assert_ne!(code, 1000);
    raw.expect_eof().await;

    wait_until(|| s.app.hub.subscriber_count("room:a") == 0).await;
    no_server_panics();
}

#[tokio::test]
async fn bad_binary_frames_get_an_error_reply_and_the_connection_continues() {
    install_panic_counter();
    let s = start().await;
    let mut ws = connect(s.addr).await;
    join(&mut ws, "1", "room:a", "{}").await;
    let mut bad_topic_utf8 = vec![0u8, 1, 1, 2, 1, b'1', b'2', 0xff, 0xfe, b'e'];
    bad_topic_utf8.extend_from_slice(b"payload");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("unknown kind 5", vec![5, 0, 0, 0, 0]),
        (
            "server-only kind 2",
            vec![2, 6, 1, b'r', b'o', b'o', b'm', b':', b'a', b'e'],
        ),
        ("truncated header", vec![0, 1]),
        ("lengths beyond the frame", vec![0, 9, 9, 9, 9, b'a']),
        ("topic not UTF-8", bad_topic_utf8),
    ];
    for (what, frame) in cases {
        ws.send(Message::binary(frame)).await.unwrap();
        let r = recv(&mut ws).await;
        assert_eq!(r[2], "phoenix", "{what}: {r}");
        assert_eq!(r[3], "phx_reply", "{what}: {r}");
        assert_eq!(r[4]["status"], "error", "{what}: {r}");
        assert!(r[4]["response"]["reason"].is_string(), "{what}: {r}");
    }
    still_works(&mut ws, &s, "room:a", "97").await;
    no_server_panics();
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[tokio::test]
async fn mutated_and_random_messages_each_get_one_reply_and_never_break_the_connection() {
    install_panic_counter();
    let s = start().await;
    let mut ws = connect(s.addr).await;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let good = r#"["1","2","room:z","ev",{"a":[1,2,{"b":null}]}]"#;
    let mut sent = 0;
    // Every prefix of a good message.
    for n in 0..good.len() {
        send(&mut ws, &good[..n]).await;
        sent += 1;
    }
    // Single-byte substitutions with printable ASCII.
    for _ in 0..300 {
        let mut b = good.as_bytes().to_vec();
        let i = (rng.next() % b.len() as u64) as usize;
        b[i] = b' ' + (rng.next() % 95) as u8;
        send(&mut ws, std::str::from_utf8(&b).unwrap()).await;
        sent += 1;
    }
    // Random binary frames.
    for _ in 0..300 {
        let len = (rng.next() % 40) as usize;
        let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if !b.is_empty() && rng.next().is_multiple_of(2) {
            b[0] = 0; // a push, to get past the kind byte more often
        }
        ws.send(Message::binary(b)).await.unwrap();
        sent += 1;
    }
    send(&mut ws, r#"[null,"end","phoenix","heartbeat",{}]"#).await;
    let mut replies = 0;
    loop {
        let r = recv(&mut ws).await;
        if r[1] == "end" {
            break;
        }
        assert_eq!(r[3], "phx_reply", "{r}");
        replies += 1;
    }
    assert_eq!(replies, sent, "one reply per message");
    assert!(
        metric_sum(s.addr, "pushgate_bad_messages_total")
            .await
            .unwrap()
            > 0.0
    );
    no_server_panics();
}

#[tokio::test]
async fn bad_messages_are_counted_and_the_server_keeps_serving() {
    install_panic_counter();
    let mut c = test_config();
    c.limits.max_frame_bytes = 2048;
    let s = start_with(c).await;
    assert_eq!(
        metric_sum(s.addr, "pushgate_bad_messages_total").await,
        Some(0.0)
    );

    // Parse errors on one connection that stays open.
    let mut ws = connect(s.addr).await;
    join(&mut ws, "1", "room:a", "{}").await;
    for bad in [
        "not json",
        r#"["1","2","room:a"]"#,
        r#"["1",2,"room:a","ev",{}]"#,
    ] {
        send(&mut ws, bad).await;
        assert_eq!(recv(&mut ws).await[4]["status"], "error");
    }
    ws.send(Message::binary(vec![7u8, 0, 0])).await.unwrap();
    assert_eq!(recv(&mut ws).await[4]["status"], "error");

    // Protocol violations, each on its own connection.
    let violations = [
        client_frame(true, OP_TEXT, &[0xff], true),
        client_frame(true, OP_TEXT, b"[]", false),
        client_frame(true, 0x3, b"", true),
        client_frame(true, OP_TEXT, &[b'x'; 4096], true),
    ];
    for v in &violations {
        let mut raw = raw_connect(s.addr).await;
        let _ = raw.send_bytes(v).await;
        let code = raw.recv_close().await;
        assert!([1002, 1007, 1009].contains(&code), "{code}");
    }

    let counted = metric_sum(s.addr, "pushgate_bad_messages_total")
        .await
        .unwrap();
    // Four parse errors and four protocol violations.
    assert!(counted >= 8.0, "every bad message is counted: {counted}");
    let (status, _, body) = http(s.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(status, 200);
    assert!(serde_json::from_slice::<Value>(&body).is_ok());
    still_works(&mut ws, &s, "room:a", "98").await;
    // Nothing was left behind by the closed connections.
    wait_until(|| {
        s.app
            .metrics
            .connections_websocket
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    send(&mut ws, r#"[null,"99","phoenix","heartbeat",{}]"#).await;
    assert_eq!(recv(&mut ws).await[1], "99");
    no_server_panics();
}

/// Refs and join_refs are kept per channel (and echoed in every reply), so they are bounded like
/// topics: at most 255 bytes (the binary format's limit). A longer one gets an error reply that
/// echoes only what fits, nothing is joined, and the connection keeps its channels.
#[tokio::test]
async fn refs_over_255_bytes_get_an_error_reply_and_nothing_is_kept() {
    install_panic_counter();
    let s = start().await;
    let mut ws = connect(s.addr).await;
    join(&mut ws, "1", "room:ok", "{}").await;
    let long = "9".repeat(9000);
    let just_over = "7".repeat(256);

    // A join whose join_ref (and ref) is 9 KB: refused, the refs not echoed.
    send(
        &mut ws,
        &format!(r#"["{long}","{long}","room:big","phx_join",{{}}]"#),
    )
    .await;
    let r = recv(&mut ws).await;
    let reason = assert_error_reply(&r, None, "room:big");
    assert_eq!(r[0], Value::Null, "{r}");
    assert!(
        reason.contains("255"),
        "the reason names the bound: {reason}"
    );
    assert_eq!(s.app.hub.subscriber_count("room:big"), 0);

    // One byte over: refused; the join_ref that fits is echoed.
    send(
        &mut ws,
        &format!(r#"["5","{just_over}","room:big","phx_join",{{}}]"#),
    )
    .await;
    let r = recv(&mut ws).await;
    assert_error_reply(&r, None, "room:big");
    assert_eq!(r[0], "5", "{r}");
    assert_eq!(s.app.hub.subscriber_count("room:big"), 0);

    // A push on a joined channel with an oversized ref: an error reply, the channel stays.
    send(
        &mut ws,
        &format!(r#"["1","{long}","room:ok","shout",{{}}]"#),
    )
    .await;
    let r = recv(&mut ws).await;
    assert_error_reply(&r, None, "room:ok");

    // Exactly 255 bytes is fine and echoed exactly.
    let max = "8".repeat(255);
    join(&mut ws, &max, "room:max", "{}").await;
    still_works(&mut ws, &s, "room:ok", "97").await;
    still_works(&mut ws, &s, "room:max", "98").await;
    no_server_panics();
}
