//! The Redis broker against a real `redis-server`, with several pushgate nodes.

mod support;

use std::time::Duration;
use support::*;

async fn node(redis: &RedisServer) -> TestServer {
    let s = start_with(redis_config(&redis.url())).await;
    wait_ready(s.addr, 200).await;
    s
}

#[tokio::test]
async fn a_message_published_on_one_node_reaches_subscribers_on_every_node() {
    let redis = RedisServer::start();
    let nodes = [node(&redis).await, node(&redis).await, node(&redis).await];
    let mut clients = Vec::new();
    for n in &nodes {
        let mut ws = connect(n.addr).await;
        let r = join(&mut ws, "1", "room:x", "{}").await;
        assert!(r["position"].as_str().unwrap().ends_with(":0"), "{r}");
        clients.push(ws);
    }
    let mut positions = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        positions.push(publish(n.addr, "room:x", "e", &i.to_string()).await);
    }
    for ws in &mut clients {
        for (i, p) in positions.iter().enumerate() {
            let m = recv(ws).await;
            assert_eq!(m[1], p.as_str());
            assert_eq!(m[4], i);
        }
    }
    // Offsets are assigned in Redis: consecutive across nodes.
    let offsets: Vec<u64> = positions
        .iter()
        .map(|p| p.rsplit_once(':').unwrap().1.parse().unwrap())
        .collect();
    assert_eq!(offsets, [1, 2, 3]);
}

#[tokio::test]
async fn a_client_recovers_on_another_node_exactly_once_in_order() {
    let redis = RedisServer::start();
    let a = node(&redis).await;
    let b = node(&redis).await;
    let mut ws = connect(a.addr).await;
    join(&mut ws, "1", "room:r", "{}").await;
    let p0 = publish(a.addr, "room:r", "n", "0").await;
    assert_eq!(recv(&mut ws).await[1], p0.as_str());
    drop(ws);
    for n in 1..=20 {
        publish(a.addr, "room:r", "n", &n.to_string()).await;
    }
    // Node B has no subscriber on the topic yet: it subscribes, reads the stream, replays.
    let mut ws = connect(b.addr).await;
    let r = join(&mut ws, "2", "room:r", &format!(r#"{{"since":"{p0}"}}"#)).await;
    assert_eq!(r["recovered"], true, "{r}");
    publish(a.addr, "room:r", "n", "21").await;
    for n in 1..=21 {
        assert_eq!(recv(&mut ws).await[4], n);
    }
    // A second client on B joins while the topic is live there, from an older position.
    let mut ws2 = connect(b.addr).await;
    let r = join(&mut ws2, "3", "room:r", &format!(r#"{{"since":"{p0}"}}"#)).await;
    assert_eq!(r["recovered"], true, "{r}");
    for n in 1..=21 {
        assert_eq!(recv(&mut ws2).await[4], n);
    }
    send(&mut ws2, r#"[null,"9","phoenix","heartbeat",{}]"#).await;
    assert_eq!(
        recv(&mut ws2).await[1],
        "9",
        "nothing duplicated after the seam"
    );
}

#[tokio::test]
async fn an_unknown_epoch_or_a_trimmed_gap_is_not_recovered() {
    let redis = RedisServer::start();
    let mut c = redis_config(&redis.url());
    c.history.size = 5;
    let a = start_with(c).await;
    wait_ready(a.addr, 200).await;
    let p0 = publish(a.addr, "room:t", "n", "0").await;
    for n in 1..10 {
        publish(a.addr, "room:t", "n", &n.to_string()).await;
    }
    let mut ws = connect(a.addr).await;
    let r = join(&mut ws, "1", "room:t", &format!(r#"{{"since":"{p0}"}}"#)).await;
    assert_eq!(r["recovered"], false, "{r}");
    let r = join(&mut ws, "2", "room:u", r#"{"since":"feed:3"}"#).await;
    assert_eq!(r["recovered"], false, "{r}");
}

#[tokio::test]
async fn a_plain_publish_is_delivered_live_without_a_position() {
    let redis = RedisServer::start();
    let a = node(&redis).await;
    let mut ws = connect(a.addr).await;
    join(&mut ws, "1", "room:p", "{}").await;
    redis.cli(&[
        "PUBLISH",
        "pushgate:room:p",
        r#"{"event":"hello","payload":{"from":"redis-cli"}}"#,
    ]);
    let m = recv(&mut ws).await;
    assert_eq!(m[1], serde_json::Value::Null);
    assert_eq!(m[3], "hello");
    assert_eq!(m[4]["from"], "redis-cli");
}

#[tokio::test]
async fn the_shipped_script_publishes_with_one_command() {
    let redis = RedisServer::start();
    let a = node(&redis).await;
    let mut ws = connect(a.addr).await;
    join(&mut ws, "1", "room:l", "{}").await;
    let script =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/redis/publish.lua")).unwrap();
    let pos = redis.cli(&[
        "EVAL",
        &script,
        "2",
        "pushgate:{room:l}:m",
        "pushgate:{room:l}:s",
        "pushgate:room:l",
        "new_msg",
        r#"{"body":"from a backend"}"#,
    ]);
    let m = recv(&mut ws).await;
    assert_eq!(m[1], pos.trim());
    assert_eq!(m[4]["body"], "from a backend");
    // A payload that is not JSON is refused by the script.
    let err = redis.cli(&[
        "EVAL",
        &script,
        "2",
        "pushgate:{room:l}:m",
        "pushgate:{room:l}:s",
        "pushgate:room:l",
        "e",
        "not json",
    ]);
    assert!(err.contains("not valid JSON"), "{err}");
}

#[tokio::test]
async fn a_topic_without_local_subscribers_is_unsubscribed() {
    let redis = RedisServer::start();
    let a = node(&redis).await;
    let numsub = || {
        let out = redis.cli(&["PUBSUB", "NUMSUB", "pushgate:room:gone"]);
        out.lines()
            .nth(1)
            .unwrap_or("0")
            .trim()
            .parse::<u32>()
            .unwrap_or(0)
    };
    let mut ws = connect(a.addr).await;
    join(&mut ws, "1", "room:gone", "{}").await;
    assert_eq!(numsub(), 1);
    send(&mut ws, r#"["1","2","room:gone","phx_leave",{}]"#).await;
    recv(&mut ws).await;
    let end = std::time::Instant::now() + DEADLINE;
    while numsub() != 0 {
        assert!(std::time::Instant::now() < end, "still subscribed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn killed_pubsub_connections_are_restored_and_nothing_is_lost() {
    let redis = RedisServer::start();
    let a = node(&redis).await;
    let b = node(&redis).await;
    let mut ws = connect(b.addr).await;
    join(&mut ws, "1", "room:k", "{}").await;
    for n in 0..5 {
        publish(a.addr, "room:k", "n", &n.to_string()).await;
    }
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    // Published while B's subscriber connection is down (or coming back).
    for n in 5..15 {
        publish(a.addr, "room:k", "n", &n.to_string()).await;
    }
    wait_ready(b.addr, 200).await;
    for n in 15..20 {
        publish(a.addr, "room:k", "n", &n.to_string()).await;
    }
    for n in 0..20 {
        assert_eq!(recv(&mut ws).await[4], n);
    }
    let m = String::from_utf8(http(b.addr, "GET", "/metrics", &[], b"").await.2).unwrap();
    assert!(!m.contains("pushgate_redis_reconnects_total 0"), "{m}");
}

#[tokio::test]
async fn a_redis_restart_turns_readyz_red_fails_publishes_loudly_and_recovers() {
    let mut redis = RedisServer::start();
    let a = node(&redis).await;
    let mut ws = connect(a.addr).await;
    join(&mut ws, "1", "room:z", "{}").await;
    publish(a.addr, "room:z", "n", "0").await;
    assert_eq!(recv(&mut ws).await[4], 0);

    redis.stop();
    wait_ready(a.addr, 503).await;
    let (_, _, body) = http(a.addr, "GET", "/readyz", &[], b"").await;
    assert!(
        String::from_utf8_lossy(&body).contains("redis"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let auth = format!("Bearer {TOKEN}");
    let (status, _, body) = http(
        a.addr,
        "POST",
        "/api/publish",
        &[("Authorization", &auth)],
        br#"{"topic":"room:z","event":"n","payload":1}"#,
    )
    .await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));

    redis.restart();
    wait_ready(a.addr, 200).await;
    // Redis lost its data (no persistence): a new epoch; the subscriber keeps receiving.
    for n in 1..5 {
        publish(a.addr, "room:z", "n", &n.to_string()).await;
    }
    for n in 1..5 {
        assert_eq!(recv(&mut ws).await[4], n);
    }
}
