//! Phoenix V2 over WebSocket, frame by frame, against a real server on 127.0.0.1:0.

mod support;

use futures_util::SinkExt;
use support::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test]
async fn heartbeat_is_answered_with_the_exact_ref_string() {
    let s = start().await;
    let mut ws = connect(s.addr).await;
    send(&mut ws, r#"[null,"9","phoenix","heartbeat",{}]"#).await;
    let reply = recv(&mut ws).await;
    assert_eq!(
        reply.to_string(),
        r#"[null,"9","phoenix","phx_reply",{"response":{},"status":"ok"}]"#
    );
}

#[tokio::test]
async fn join_then_broadcast_carries_the_position_in_the_ref_slot() {
    let s = start().await;
    let mut ws = connect(s.addr).await;
    let response = join(&mut ws, "6", "room:lobby", "{}").await;
    let position = response["position"].as_str().unwrap().to_string();
    assert!(position.ends_with(":0"), "{position}");
    assert!(response.get("recovered").is_none());

    let published = publish(s.addr, "room:lobby", "new_msg", r#"{"body":"hi"}"#).await;
    let msg = recv(&mut ws).await;
    assert_eq!(msg[0], serde_json::Value::Null);
    assert_eq!(msg[1], published.as_str());
    assert_eq!(msg[2], "room:lobby");
    assert_eq!(msg[3], "new_msg");
    assert_eq!(msg[4]["body"], "hi");
    let epoch = position.rsplit_once(':').unwrap().0;
    assert_eq!(published, format!("{epoch}:1"));
}

#[tokio::test]
async fn every_subscriber_gets_every_message_in_order() {
    let s = start().await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut ws = connect(s.addr).await;
        join(&mut ws, &i.to_string(), "room:many", "{}").await;
        clients.push(ws);
    }
    for n in 0..30 {
        publish(s.addr, "room:many", "n", &n.to_string()).await;
    }
    for ws in &mut clients {
        for n in 0..30 {
            let m = recv(ws).await;
            assert_eq!(m[4], n);
        }
    }
    let metrics = String::from_utf8(http(s.addr, "GET", "/metrics", &[], b"").await.2).unwrap();
    assert!(
        metrics.contains("pushgate_messages_delivered_total{transport=\"websocket\"} 600"),
        "{metrics}"
    );
    assert!(metrics.contains("pushgate_connections{transport=\"websocket\"} 20"));
    assert!(metrics.contains("pushgate_websocket_upgrades_total{http=\"1.1\"} 20"));
    assert!(metrics.contains("pushgate_websocket_upgrades_total{http=\"2\"} 0"));
}

#[tokio::test]
async fn client_push_gets_an_error_reply_with_refs_echoed() {
    let s = start().await;
    let mut ws = connect(s.addr).await;
    join(&mut ws, "6", "room:a", "{}").await;
    send(&mut ws, r#"["6","7","room:a","shout",{"a":1}]"#).await;
    let r = recv(&mut ws).await;
    assert_eq!(r[0], "6");
    assert_eq!(r[1], "7");
    assert_eq!(r[2], "room:a");
    assert_eq!(r[3], "phx_reply");
    assert_eq!(r[4]["status"], "error");
    assert!(r[4]["response"]["reason"].is_string());
}

#[tokio::test]
async fn unmatched_topic_and_leave_of_unjoined_topic() {
    let s = start().await;
    let mut ws = connect(s.addr).await;
    send(&mut ws, r#"["3","4","room:x","shout",{}]"#).await;
    assert_eq!(
        recv(&mut ws).await.to_string(),
        r#"[null,"4","room:x","phx_reply",{"response":{"reason":"unmatched topic"},"status":"error"}]"#
    );
    send(&mut ws, r#"["3","5","room:x","phx_leave",{}]"#).await;
    assert_eq!(
        recv(&mut ws).await.to_string(),
        r#"["3","5","room:x","phx_reply",{"response":{},"status":"ok"}]"#
    );
}

#[tokio::test]
async fn leave_replies_ok_then_closes_and_stops_delivery() {
    let s = start().await;
    let mut ws = connect(s.addr).await;
    join(&mut ws, "6", "room:a", "{}").await;
    join(&mut ws, "8", "room:b", "{}").await;
    send(&mut ws, r#"["6","7","room:a","phx_leave",{}]"#).await;
    assert_eq!(
        recv(&mut ws).await.to_string(),
        r#"["6","7","room:a","phx_reply",{"response":{},"status":"ok"}]"#
    );
    assert_eq!(
        recv(&mut ws).await.to_string(),
        r#"["6","6","room:a","phx_close",{}]"#
    );
    publish(s.addr, "room:a", "e", "1").await;
    publish(s.addr, "room:b", "e", "2").await;
    let m = recv(&mut ws).await;
    assert_eq!(m[2], "room:b", "only the still-joined topic delivers: {m}");
    wait_until(|| s.app.hub.subscriber_count("room:a") == 0).await;
}

#[tokio::test]
async fn stale_join_refs_are_ignored() {
    let s = start().await;
    let mut ws = connect(s.addr).await;
    join(&mut ws, "6", "room:a", "{}").await;
    // A push and a leave for an earlier join of the same topic: no reply, still joined.
    send(&mut ws, r#"["2","7","room:a","shout",{}]"#).await;
    send(&mut ws, r#"["2","8","room:a","phx_leave",{}]"#).await;
    send(&mut ws, r#"[null,"9","phoenix","heartbeat",{}]"#).await;
    let r = recv(&mut ws).await;
    assert_eq!(r[1], "9", "the stale messages must get no reply: {r}");
    publish(s.addr, "room:a", "e", "1").await;
    assert_eq!(recv(&mut ws).await[2], "room:a");
}

#[tokio::test]
async fn rejoining_a_joined_topic_closes_the_old_join_first() {
    let s = start().await;
    let mut ws = connect(s.addr).await;
    join(&mut ws, "6", "room:a", "{}").await;
    send(&mut ws, r#"["10","10","room:a","phx_join",{}]"#).await;
    assert_eq!(
        recv(&mut ws).await.to_string(),
        r#"["6","6","room:a","phx_close",{}]"#
    );
    let r = recv(&mut ws).await;
    assert_eq!((r[0].as_str(), r[1].as_str()), (Some("10"), Some("10")));
    assert_eq!(r[4]["status"], "ok");
    assert_eq!(s.app.hub.subscriber_count("room:a"), 1);
}

#[tokio::test]
async fn since_replays_the_gap_once_in_order_then_live() {
    let s = start().await;
    let first = publish(s.addr, "room:r", "n", "0").await;
    for n in 1..50 {
        publish(s.addr, "room:r", "n", &n.to_string()).await;
    }
    let mut ws = connect(s.addr).await;
    let resp = join(&mut ws, "6", "room:r", &format!(r#"{{"since":"{first}"}}"#)).await;
    assert_eq!(resp["recovered"], true);
    assert!(resp["position"].as_str().unwrap().ends_with(":50"));
    publish(s.addr, "room:r", "n", "50").await;
    for n in 1..=50 {
        let m = recv(&mut ws).await;
        assert_eq!(m[4], n, "message {n}: {m}");
    }
    send(&mut ws, r#"[null,"99","phoenix","heartbeat",{}]"#).await;
    assert_eq!(
        recv(&mut ws).await[1],
        "99",
        "no duplicate after the live message"
    );
}

/// `history.max_age_secs`: a message stays in history that long, then a join asking for it
/// gets `recovered: false`. Polled, with bounds on both sides: not dropped before its age, and
/// dropped within a couple of seconds after it.
#[tokio::test]
async fn history_keeps_a_message_for_max_age_secs_then_drops_it() {
    use std::time::{Duration, Instant};
    const AGE: Duration = Duration::from_secs(1);
    let mut c = test_config();
    c.history.max_age_secs = AGE.as_secs();
    let s = start_with(c).await;
    let t0 = Instant::now();
    let first = publish(s.addr, "room:age", "n", "0").await;
    let (epoch, offset) = split_position(&first);
    let since = format!(r#"{{"since":"{epoch}:{}"}}"#, offset - 1);
    let mut ws = connect(s.addr).await;
    let resp = join(&mut ws, "6", "room:age", &since).await;
    if t0.elapsed() < AGE {
        assert_eq!(
            resp["recovered"], true,
            "dropped before history.max_age_secs"
        );
        assert_eq!(recv(&mut ws).await[4], 0);
    }
    let gone = loop {
        let mut ws = connect(s.addr).await;
        let resp = join(&mut ws, "6", "room:age", &since).await;
        if resp["recovered"] == false {
            break t0.elapsed();
        }
        assert!(
            t0.elapsed() < AGE + Duration::from_secs(3),
            "still in history long after history.max_age_secs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        gone >= AGE,
        "dropped after {gone:?}, before history.max_age_secs"
    );
}

/// `server.idle_timeout_ms`: a WebSocket that sends nothing for that long is closed with 1001
/// (no sooner), and one that keeps sending heartbeats stays open past it. Production asks for at
/// least 35 s (`Config::validate`); this server is started without the check, at 400 ms.
#[tokio::test]
async fn an_idle_websocket_is_closed_with_1001_after_idle_timeout_ms_and_a_busy_one_is_not() {
    use std::time::{Duration, Instant};
    const IDLE: Duration = Duration::from_millis(400);
    let mut c = test_config();
    c.server.idle_timeout_ms = IDLE.as_millis() as u64;
    let s = start_unvalidated(c).await;
    // Before the idle connection exists: its idle clock starts after this, whatever the time
    // the second connection takes (under load, long enough to make "no sooner" fail by itself).
    let t0 = Instant::now();
    let mut idle = connect(s.addr).await;
    let mut busy = connect(s.addr).await;
    let closed = tokio::spawn(async move { (recv_close(&mut idle).await, t0.elapsed()) });
    let mut n = 0;
    while !closed.is_finished() {
        n += 1;
        send(
            &mut busy,
            &format!(r#"[null,"{n}","phoenix","heartbeat",{{}}]"#),
        )
        .await;
        assert_eq!(recv(&mut busy).await[1], n.to_string());
        assert!(
            t0.elapsed() < IDLE * 10,
            "the idle connection was never closed"
        );
        tokio::time::sleep(IDLE / 4).await;
    }
    let (code, at) = closed.await.unwrap();
    assert_eq!(code, 1001, "an idle close is 1001");
    assert!(
        at >= IDLE,
        "closed after {at:?}, before server.idle_timeout_ms"
    );
    // The busy one, open as long and longer, still answers.
    send(&mut busy, r#"[null,"last","phoenix","heartbeat",{}]"#).await;
    assert_eq!(recv(&mut busy).await[1], "last");
    assert!(t0.elapsed() > IDLE);
}

#[tokio::test]
async fn since_outside_history_says_recovered_false() {
    let mut c = test_config();
    c.history.size = 5;
    let s = start_with(c).await;
    let first = publish(s.addr, "room:r", "n", "0").await;
    for n in 1..10 {
        publish(s.addr, "room:r", "n", &n.to_string()).await;
    }
    let mut ws = connect(s.addr).await;
    let resp = join(&mut ws, "6", "room:r", &format!(r#"{{"since":"{first}"}}"#)).await;
    assert_eq!(resp["recovered"], false);
    let resp = join(&mut ws, "7", "room:q", r#"{"since":"nope:5"}"#).await;
    assert_eq!(resp["recovered"], false);
    // Nothing is replayed: the next frame is the heartbeat reply.
    send(&mut ws, r#"[null,"9","phoenix","heartbeat",{}]"#).await;
    let r = recv(&mut ws).await;
    assert!(r[3] == "phx_close" || r[1] == "9", "{r}");
}

#[tokio::test]
async fn binary_push_is_parsed_and_answered() {
    let s = start().await;
    let mut ws = connect(s.addr).await;
    join(&mut ws, "6", "room:lobby", "{}").await;
    // 00 01 01 0a 03 "6" "9" "room:lobby" "bin" ca fe
    let mut f = vec![0u8, 1, 1, 10, 3];
    f.extend_from_slice(b"69room:lobbybin");
    f.extend_from_slice(&[0xca, 0xfe]);
    ws.send(Message::binary(f)).await.unwrap();
    let r = recv(&mut ws).await;
    assert_eq!((r[0].as_str(), r[1].as_str()), (Some("6"), Some("9")));
    assert_eq!(r[4]["status"], "error");
}

#[tokio::test]
async fn phoenix_subprotocol_is_echoed_when_an_auth_token_is_offered() {
    let s = start().await;
    let mut req = format!("ws://{}/socket/websocket?vsn=2.0.0", s.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "phoenix, base64url.bearer.phx.bXktYXV0aC10b2s"
            .parse()
            .unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "phoenix");
    send(&mut ws, r#"[null,"1","phoenix","heartbeat",{}]"#).await;
    assert_eq!(recv(&mut ws).await[1], "1");
}

#[tokio::test]
async fn wrong_protocol_version_is_refused_before_the_upgrade() {
    let s = start().await;
    let url = format!("ws://{}/socket/websocket?vsn=1.0.0", s.addr);
    let err = tokio_tungstenite::connect_async(url).await.unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 403),
        other => panic!("expected HTTP 403, got {other}"),
    }
}

#[tokio::test]
async fn a_slow_consumer_is_closed_with_1013_and_does_not_slow_the_others() {
    let mut c = test_config();
    c.history.size = 64;
    c.publish.max_body_bytes = 4 * 1024 * 1024;
    let s = start_with(c).await;
    let mut slow = connect(s.addr).await;
    join(&mut slow, "1", "room:s", "{}").await;
    let mut fast = connect(s.addr).await;
    join(&mut fast, "1", "room:s", "{}").await;

    let batches = 40;
    let per_batch = 50;
    let reader = tokio::spawn(async move {
        let mut n = 0;
        while n < batches * per_batch {
            let m = recv(&mut fast).await;
            assert_eq!(m[4]["n"], n, "fast subscriber out of order");
            n += 1;
        }
        n
    });
    let blob = "x".repeat(10_000);
    let auth = format!("Bearer {TOKEN}");
    let addr = s.addr;
    let publisher = tokio::spawn(async move {
        for b in 0..batches {
            let items: Vec<String> = (0..per_batch)
                .map(|i| {
                    format!(
                        r#"{{"topic":"room:s","event":"e","payload":{{"n":{},"blob":"{blob}"}}}}"#,
                        b * per_batch + i
                    )
                })
                .collect();
            let body = format!("[{}]", items.join(","));
            let (status, _, _) = post_publish(addr, Some(&auth), body.as_bytes()).await;
            assert_eq!(status, 200);
        }
    });
    // Read the slow connection as soon as it is closed: its close frame waits behind the data
    // it did not read, and the server gives a peer that reads nothing 2 s before it lets go.
    wait_until(|| {
        s.app
            .metrics
            .slow_consumer_closes
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    assert_eq!(recv_close(&mut slow).await, 1013);
    publisher.await.unwrap();
    assert_eq!(reader.await.unwrap(), batches * per_batch);
}

/// A server that lets a subscriber fall far behind (large messages, no slow-consumer close),
/// and a connected client.
async fn start_for_large_backlogs() -> (TestServer, Ws) {
    let mut c = test_config();
    c.history.size = 1000;
    c.limits.max_pending_bytes = 256 * 1024 * 1024;
    c.publish.max_body_bytes = 1024 * 1024;
    let s = start_with(c).await;
    let ws = connect(s.addr).await;
    (s, ws)
}

/// Publishes `{"n":0..count,"blob":"xx…"}` (a blob of `len` bytes) to `topic`, one at a time.
async fn publish_numbered(addr: std::net::SocketAddr, topic: &'static str, count: u64, len: usize) {
    let blob = "x".repeat(len);
    for n in 0..count {
        publish(addr, topic, "e", &format!(r#"{{"n":{n},"blob":"{blob}"}}"#)).await;
    }
}

#[tokio::test]
async fn direct_writes_that_fill_the_socket_hand_the_rest_to_the_connection() {
    // One message at a time to a subscriber that does not read: while its connection is parked,
    // each publish writes the frame to the socket itself, until the socket takes only part of
    // one; the connection's task must then finish that frame before anything else. And once the
    // client reads and the socket drains, the task must come back for what waited in the topic
    // meanwhile: the publishes are over, so nothing else will wake it (this stalled before).
    let (s, mut ws) = start_for_large_backlogs().await;
    join(&mut ws, "1", "room:d", "{}").await;
    let count = 150; // 30 MB: more than loopback's socket buffers hold
    publish_numbered(s.addr, "room:d", count, 200_000).await;
    for n in 0..count {
        let m = recv(&mut ws).await;
        assert_eq!(m[4]["n"], n, "out of order");
        assert_eq!(m[4]["blob"].as_str().map(str::len), Some(200_000));
    }
    assert_eq!(
        s.app
            .metrics
            .slow_consumer_closes
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn direct_writes_from_two_topics_to_one_connection_never_interleave() {
    // Both topics' publishes write to the same parked socket; frames must stay whole and each
    // topic in order, across partial writes handed to the task.
    let (s, mut ws) = start_for_large_backlogs().await;
    join(&mut ws, "1", "room:a", "{}").await;
    join(&mut ws, "2", "room:b", "{}").await;
    let count = 100;
    let (addr_a, addr_b) = (s.addr, s.addr);
    // Two publishers at once, each one message at a time, sizes differing so that partial
    // writes land at different offsets.
    let a = tokio::spawn(publish_numbered(addr_a, "room:a", count, 150_001));
    let b = tokio::spawn(publish_numbered(addr_b, "room:b", count, 70_003));
    a.await.unwrap();
    b.await.unwrap();
    let mut next = std::collections::HashMap::from([("room:a", 0), ("room:b", 0)]);
    for _ in 0..2 * count {
        let m = recv(&mut ws).await;
        let topic = m[2].as_str().unwrap().to_string();
        let expected = next.get_mut(topic.as_str()).expect("a joined topic");
        assert_eq!(m[4]["n"], *expected, "{topic} out of order");
        let len = if topic == "room:a" { 150_001 } else { 70_003 };
        assert_eq!(m[4]["blob"].as_str().map(str::len), Some(len));
        *expected += 1;
    }
}

#[tokio::test]
async fn a_large_topic_swept_by_the_fanout_task_delivers_everything_in_order() {
    // More subscribers than are woken inline, so deliveries go through the chunked fanout task,
    // with publishes landing while sweeps run. 300 clients from one address.
    let s = start_with(many_clients_config()).await;
    let mut readers = Vec::new();
    for i in 0..300 {
        let mut ws = connect(s.addr).await;
        join(&mut ws, &i.to_string(), "room:big", "{}").await;
        readers.push(tokio::spawn(async move {
            for n in 0..200 {
                let m = recv(&mut ws).await;
                assert_eq!(m[4], n, "subscriber {i}");
            }
        }));
    }
    let auth = format!("Bearer {TOKEN}");
    for batch in 0..4 {
        let items: Vec<String> = (0..50)
            .map(|i| {
                format!(
                    r#"{{"topic":"room:big","event":"n","payload":{}}}"#,
                    batch * 50 + i
                )
            })
            .collect();
        let body = format!("[{}]", items.join(","));
        let (status, _, _) = post_publish(s.addr, Some(&auth), body.as_bytes()).await;
        assert_eq!(status, 200);
    }
    for r in readers {
        r.await.unwrap();
    }
}

#[tokio::test]
async fn the_session_also_runs_over_any_byte_stream_through_the_polled_adapter() {
    // TLS at the edge and HTTP/2 streams (RFC 8441) reach the transport as plain
    // AsyncRead + AsyncWrite streams; an in-memory pipe stands in for them here.
    let s = start().await;
    let (mut ws, _task) = over_a_pipe(&s).await;
    ws.send(Message::text(r#"["1","1","room:p","phx_join",{}]"#))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await[4]["status"], "ok");
    // More than the pipe and the adapter's stage hold at once: writes must resume.
    let blob = "y".repeat(2000);
    for n in 0..100 {
        publish(
            s.addr,
            "room:p",
            "n",
            &format!(r#"{{"n":{n},"b":"{blob}"}}"#),
        )
        .await;
    }
    for n in 0..100 {
        assert_eq!(next_json(&mut ws).await[4]["n"], n);
    }
    ws.send(Message::text(r#"[null,"9","phoenix","heartbeat",{}]"#))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await[1], "9");
}

#[tokio::test]
async fn a_client_close_over_the_polled_adapter_is_answered_before_the_stream_ends() {
    // The adapter stages writes: the close reply must be flushed before the task lets the
    // stream go (Autobahn over TLS found it dropped; tests/acme.rs runs the whole suite there).
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::protocol::{CloseFrame, frame::coding::CloseCode};
    let s = start().await;
    let (mut ws, task) = over_a_pipe(&s).await;
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    let reply = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("a reply before the deadline");
    match reply {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Normal),
        other => panic!("expected the close reply, got {other:?}"),
    }
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("the connection task to end after the closing handshake")
        .unwrap();
}

/// A WebSocket session run over an in-memory pipe through the `Polled` adapter (standing in for
/// TLS at the edge and HTTP/2 streams): the client end, and the connection task.
async fn over_a_pipe(
    s: &TestServer,
) -> (
    tokio_tungstenite::WebSocketStream<tokio::io::DuplexStream>,
    tokio::task::JoinHandle<()>,
) {
    use pushgate::transport::websocket::{Polled, run};
    let (client, server) = tokio::io::duplex(256);
    let task = tokio::spawn(run(
        s.app.clone(),
        Polled::new(server),
        Vec::new(),
        Default::default(),
    ));
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        client,
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    (ws, task)
}

async fn next_json<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> serde_json::Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    loop {
        let m = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("no frame before the deadline")
            .expect("stream ended")
            .expect("websocket error");
        if let Message::Text(t) = m {
            return serde_json::from_str(&t).unwrap();
        }
    }
}
