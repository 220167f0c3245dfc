//! The Redis broker against a real `redis-server`, with several pushgate nodes.

mod support;

use std::time::Duration;
use support::*;

async fn node(redis: &RedisServer) -> TestServer {
    log();
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
    let pos = publish_lua(
        &redis,
        "room:l",
        "pushgate:room:l",
        r#"{"body":"from a backend"}"#,
    );
    let m = recv(&mut ws).await;
    assert_eq!(m[1], pos.trim());
    assert_eq!(m[4]["body"], "from a backend");
    // A payload that is not JSON is refused by the script.
    let err = publish_lua(&redis, "room:l", "pushgate:room:l", "not json");
    assert!(err.contains("not valid JSON"), "{err}");
}

/// Publishes event `new_msg` with `payload` to `topic` through the shipped script, announced on
/// `channel`, as a backend would; returns the script's answer (the position, or its error).
fn publish_lua(redis: &RedisServer, topic: &str, channel: &str, payload: &str) -> String {
    let script =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/redis/publish.lua")).unwrap();
    redis.cli(&[
        "EVAL",
        &script,
        "2",
        &format!("pushgate:{{{topic}}}:m"),
        &format!("pushgate:{{{topic}}}:s"),
        channel,
        "new_msg",
        payload,
    ])
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

/// `history.max_age_secs` with Redis: a topic's meta hash and history stream expire that long
/// after its last publish (the TTL is set on both), and then the history is gone: a join asking
/// for it gets `recovered: false` and the next publish starts a new epoch.
#[tokio::test]
async fn with_redis_history_keys_expire_max_age_secs_after_the_last_publish() {
    let redis = RedisServer::start();
    let mut c = redis_config(&redis.url());
    c.history.max_age_secs = 2;
    let s = start_with(c).await;
    wait_ready(s.addr, 200).await;
    let first = publish(s.addr, "room:exp", "n", "0").await;
    let keys = ["pushgate:{room:exp}:m", "pushgate:{room:exp}:s"];
    for key in keys {
        let ttl: i64 = redis.cli(&["PTTL", key]).trim().parse().unwrap();
        assert!(
            (1..=2000).contains(&ttl),
            "{key}: PTTL {ttl}, want at most 2000 ms"
        );
    }
    let end = std::time::Instant::now() + Duration::from_secs(2) + DEADLINE;
    while keys.iter().any(|k| redis.cli(&["EXISTS", k]).trim() != "0") {
        assert!(std::time::Instant::now() < end, "the keys never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (epoch, offset) = split_position(&first);
    let mut ws = connect(s.addr).await;
    let since = format!(r#"{{"since":"{epoch}:{}"}}"#, offset - 1);
    let resp = join(&mut ws, "1", "room:exp", &since).await;
    assert_eq!(resp["recovered"], false, "{resp}");
    let next = publish(s.addr, "room:exp", "n", "1").await;
    assert_ne!(
        split_position(&next).0,
        epoch,
        "a new epoch after the history expired"
    );
}

/// The test harness itself: a Redis whose port was taken (by another process, between the
/// pick and the bind) starts on another port instead of failing the test.
#[test]
fn a_test_redis_whose_port_is_taken_starts_on_another() {
    let port = free_port();
    let _taken = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let redis = RedisServer::start_from(port);
    assert_ne!(redis.port, port);
    assert_eq!(redis.cli(&["ping"]).trim(), "PONG");
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
    // Each node's subscriber connection (A's listens on its node channel, B's on the topic too).
    let subscribers = redis
        .cli(&["CLIENT", "LIST", "TYPE", "pubsub"])
        .lines()
        .count();
    assert_eq!(subscribers, 2, "one subscriber connection per node");
    let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_eq!(killed.trim(), "2", "CLIENT KILL must have killed both");
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
    // B lost its subscriber connection and made a new one: counted (present and not 0).
    let reconnects = metric(b.addr, "pushgate_redis_reconnects_total").await;
    assert!(reconnects.is_some_and(|n| n >= 1.0), "{reconnects:?}");
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

fn lp_url(token: &str) -> String {
    format!("/socket/longpoll?vsn=2.0.0&token={token}")
}

async fn lp(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> serde_json::Value {
    let (status, _, body) = http(addr, method, path, &[], body).await;
    assert_eq!(status, 200);
    serde_json::from_slice(&body).unwrap()
}

/// Every frame of a poll answer, parsed.
fn frames(v: &serde_json::Value) -> Vec<serde_json::Value> {
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| serde_json::from_str(m.as_str().unwrap()).unwrap())
        .collect()
}

#[tokio::test]
async fn a_longpoll_session_is_served_by_any_node() {
    let redis = RedisServer::start();
    let mut ca = redis_config(&redis.url());
    ca.longpoll.window_ms = 300;
    ca.longpoll.session_timeout_ms = 5000;
    let a = start_with(ca.clone()).await;
    let b = start_with(ca).await;
    wait_ready(a.addr, 200).await;
    wait_ready(b.addr, 200).await;
    let nodes = [a.addr, b.addr];

    // The session is created on A...
    let first = lp(a.addr, "GET", "/socket/longpoll?vsn=2.0.0&", b"").await;
    assert_eq!(first["status"], 410);
    let token = first["token"].as_str().unwrap().to_string();
    // ...joined through B...
    let r = lp(
        b.addr,
        "POST",
        &lp_url(&token),
        br#"["1","1","room:lp","phx_join",{}]"#,
    )
    .await;
    assert_eq!(r["status"], 200);
    // ...and polled on both, alternately, while messages are published on both.
    let mut got = Vec::new();
    let mut joined = false;
    let mut published = 0;
    for round in 0..60 {
        if joined && published < 20 {
            publish(nodes[published % 2], "room:lp", "n", &published.to_string()).await;
            published += 1;
        }
        let v = lp(nodes[round % 2], "GET", &lp_url(&token), b"").await;
        assert!(v["status"] == 200 || v["status"] == 204, "{v}");
        for f in frames(&v) {
            if f[3] == "phx_reply" {
                joined = true;
            } else {
                got.push(f[4].as_u64().unwrap());
            }
        }
        if got.len() == 20 {
            break;
        }
    }
    assert_eq!(got, (0..20).collect::<Vec<u64>>());

    // The owner stops: its sessions are gone for the other node too.
    a.stop.cancel();
    assert!(a.handle.await.unwrap());
    let v = lp(b.addr, "GET", &lp_url(&token), b"").await;
    assert_eq!(v["status"], 500, "{v}");
}

#[tokio::test]
async fn a_drained_node_hands_its_clients_over_without_loss() {
    let redis = RedisServer::start();
    let a = node(&redis).await;
    let b = node(&redis).await;
    let mut ws = connect(a.addr).await;
    join(&mut ws, "1", "room:d", "{}").await;
    let mut last = String::new();
    for n in 0..5 {
        publish(b.addr, "room:d", "n", &n.to_string()).await;
        let m = recv(&mut ws).await;
        assert_eq!(m[4], n);
        last = m[1].as_str().unwrap().to_string();
    }
    a.stop.cancel();
    assert_eq!(recv_close(&mut ws).await, 1012);
    // Published while the client moves to node B.
    for n in 5..10 {
        publish(b.addr, "room:d", "n", &n.to_string()).await;
    }
    let mut ws = connect(b.addr).await;
    let r = join(&mut ws, "2", "room:d", &format!(r#"{{"since":"{last}"}}"#)).await;
    assert_eq!(r["recovered"], true);
    for n in 5..10 {
        assert_eq!(recv(&mut ws).await[4], n);
    }
}

#[tokio::test]
async fn a_frozen_redis_turns_readyz_red_within_seconds_and_the_node_recovers() {
    let redis = RedisServer::start();
    let a = node(&redis).await;
    let mut ws = connect(a.addr).await;
    join(&mut ws, "1", "room:f", "{}").await;
    redis.pause();
    let t0 = std::time::Instant::now();
    wait_ready(a.addr, 503).await;
    // README: "within a second or two": a ping every second, each allowed a second, so at
    // most 2 s after the freeze, plus a little for scheduling.
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "readyz took {:?} to notice",
        t0.elapsed()
    );
    redis.resume();
    wait_ready(a.addr, 200).await;
    publish(a.addr, "room:f", "n", "1").await;
    assert_eq!(recv(&mut ws).await[4], 1);
}

/// Issue 20 (the soak's 20-second `/readyz`): joins that need history keep the broker busy
/// with reads that wait out their timeout on a frozen Redis. The ping must still come when it
/// is due, and a read that times out says as much as a failed ping; and none of those joins
/// may be told `recovered: false` for history Redis still holds (they fail as unavailable, and
/// phoenix.js joins again). Fails without the fix: `/readyz` stays 200 for 3 s or more while
/// the joins keep coming, and the joins are answered `recovered: false`.
#[tokio::test]
async fn a_frozen_redis_turns_readyz_red_within_seconds_while_joins_wait_for_history() {
    let redis = RedisServer::start();
    let a = node(&redis).await;
    // Published before node A has a subscriber: A's buffer does not hold them, so a join
    // from before them reads them from the stream.
    let first = publish(a.addr, "room:h", "n", "1").await;
    for n in 2..=3 {
        publish(a.addr, "room:h", "n", &n.to_string()).await;
    }
    let mut live = connect(a.addr).await;
    join(&mut live, "1", "room:h", "{}").await;
    let since = format!(r#"{{"since":"{first}"}}"#);
    let mut check = connect(a.addr).await;
    let r = join(&mut check, "1", "room:h", &since).await;
    assert_eq!(r["recovered"], true, "{r}");
    redis.pause();
    let t0 = std::time::Instant::now();
    // A join that needs history every 50 ms until the node is red.
    let red = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let joiner = {
        let (since, red) = (since.clone(), red.clone());
        tokio::spawn(async move {
            let mut clients = Vec::new();
            while !red.load(std::sync::atomic::Ordering::Relaxed) && clients.len() < 200 {
                let mut ws = connect(a.addr).await;
                send(
                    &mut ws,
                    &format!(r#"["1","1","room:h","phx_join",{since}]"#),
                )
                .await;
                clients.push(ws);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            clients
        })
    };
    wait_ready(a.addr, 503).await;
    let took = t0.elapsed();
    red.store(true, std::sync::atomic::Ordering::Relaxed);
    let clients = joiner.await.unwrap();
    assert!(
        took < Duration::from_millis(2500),
        "readyz took {took:?} to notice while {} joins came",
        clients.len()
    );
    redis.resume();
    wait_ready(a.addr, 200).await;
    // Every join sent while Redis was frozen is answered: an error (phoenix.js joins again)
    // or its history; never `recovered: false` for history Redis holds.
    for mut ws in clients {
        let reply = recv(&mut ws).await;
        assert_eq!(reply[3], "phx_reply", "{reply}");
        let recovered = &reply[4]["response"]["recovered"];
        assert!(
            reply[4]["status"] == "error" || *recovered == true,
            "a join during the freeze: {reply}"
        );
    }
    let mut again = connect(a.addr).await;
    let r = join(&mut again, "1", "room:h", &since).await;
    assert_eq!(r["recovered"], true, "after the thaw: {r}");
    publish(a.addr, "room:h", "n", "4").await;
    assert_eq!(recv(&mut live).await[4], 4);
}

/// A new LongPoll session on `addr`; returns its token and the id of the node that owns it
/// (the token is `lp` + node id + random, so any client can read it).
async fn lp_session(addr: std::net::SocketAddr) -> (String, String) {
    let first = lp(addr, "GET", "/socket/longpoll?vsn=2.0.0&", b"").await;
    assert_eq!(first["status"], 410);
    let token = first["token"].as_str().unwrap().to_string();
    let node = token[2..10].to_string();
    (token, node)
}

fn numsub(redis: &RedisServer, channel: &str) -> u32 {
    let out = redis.cli(&["PUBSUB", "NUMSUB", channel]);
    out.lines()
        .nth(1)
        .unwrap_or("0")
        .trim()
        .parse::<u32>()
        .unwrap_or(0)
}

/// Joins on `via` through the session `token`, publishes on `publisher` and polls on `via`
/// until the message arrives: the session works from that node.
async fn longpoll_works_through(
    via: std::net::SocketAddr,
    publisher: std::net::SocketAddr,
    token: &str,
    topic: &str,
) {
    let join = format!(r#"["1","1","{topic}","phx_join",{{}}]"#);
    let r = lp(via, "POST", &lp_url(token), join.as_bytes()).await;
    assert_eq!(r["status"], 200, "POST through the other node: {r}");
    let mut joined = false;
    let mut published = false;
    for _ in 0..20 {
        if joined && !published {
            publish(publisher, topic, "n", "7").await;
            published = true;
        }
        let v = lp(via, "GET", &lp_url(token), b"").await;
        assert!(
            v["status"] == 200 || v["status"] == 204,
            "GET through the other node: {v}"
        );
        for f in frames(&v) {
            if f[3] == "phx_reply" {
                assert_eq!(f[4]["status"], "ok", "{f}");
                joined = true;
            } else if f[3] == "n" {
                assert_eq!(f[4], 7);
                return;
            }
        }
    }
    panic!("the message never arrived through the other node");
}

#[tokio::test]
async fn topics_named_like_internal_channels_cannot_cut_nodes_off() {
    let redis = RedisServer::start();
    let mut c = redis_config(&redis.url());
    c.longpoll.window_ms = 300;
    c.longpoll.session_timeout_ms = 10_000;
    let a = start_with(c.clone()).await;
    let b = start_with(c).await;
    wait_ready(a.addr, 200).await;
    wait_ready(b.addr, 200).await;
    let (token_a, id_a) = lp_session(a.addr).await;
    let (token_b, id_b) = lp_session(b.addr).await;

    // A hostile client on each node joins and leaves topics named like every node-internal
    // key and channel it can guess (node ids are in every LongPoll token).
    let internal_looking = [
        format!("node:{id_a}"),
        format!("node:{id_b}"),
        format!("presence:node:{id_a}"),
        format!("presence:node:{id_b}"),
        "presence:nodes".to_string(),
        "internal:node:x".to_string(),
        ".internal:node:x".to_string(),
    ];
    for n in [a.addr, b.addr] {
        let mut ws = connect(n).await;
        for (i, topic) in internal_looking.iter().enumerate() {
            join(&mut ws, &i.to_string(), topic, "{}").await;
            send(
                &mut ws,
                &format!(r#"["{i}","l{i}","{topic}","phx_leave",{{}}]"#),
            )
            .await;
            assert_eq!(recv(&mut ws).await[1], format!("l{i}"));
            assert_eq!(recv(&mut ws).await[3], "phx_close");
        }
    }
    // Each node has let go of those topics' channels...
    for topic in &internal_looking {
        let channel = format!("pushgate:{topic}");
        let end = std::time::Instant::now() + DEADLINE;
        while numsub(&redis, &channel) != 0 {
            assert!(
                std::time::Instant::now() < end,
                "{channel} still subscribed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // ...and cross-node LongPoll still works both ways (requests and answers travel on the
    // nodes' own channels).
    longpoll_works_through(b.addr, a.addr, &token_a, "room:after-a").await;
    longpoll_works_through(a.addr, b.addr, &token_b, "room:after-b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_flood_on_one_connection_does_not_delay_another_client_s_join() {
    use futures_util::{SinkExt, StreamExt};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio_tungstenite::tungstenite::Message;
    let redis = RedisServer::start();
    // The broker's own bounds are under test: the per-connection join rate
    // (limits.join_rate_per_connection, tests/admission.rs), which would refuse this flood
    // first, is off.
    let mut config = redis_config(&redis.url());
    config.limits.join_rate_per_connection = 0;
    let a = start_with(config).await;
    wait_ready(a.addr, 200).await;

    // The hostile socket: 30,000 join/leave pairs on fresh topics, each join needing Redis,
    // while it reads everything it is sent (so the server never stops reading it).
    let (mut tx, mut rx) = connect(a.addr).await.split();
    let frames = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(std::sync::Mutex::new(None::<String>));
    let (f, r) = (frames.clone(), refused.clone());
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = rx.next().await {
            let Message::Text(t) = m else { continue };
            f.fetch_add(1, Ordering::Relaxed);
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if v[1] == "hb" {
                return true;
            }
            if v[3] == "phx_reply" && v[4]["status"] == "error" {
                r.lock()
                    .unwrap()
                    .get_or_insert(v[4]["response"].to_string());
            }
        }
        false
    });
    let flood = tokio::spawn(async move {
        for i in 0..30_000 {
            let join = format!(r#"["j{i}","j{i}","flood:{i}","phx_join",{{}}]"#);
            let leave = format!(r#"["j{i}","l{i}","flood:{i}","phx_leave",{{}}]"#);
            tx.feed(Message::text(join)).await.unwrap();
            tx.feed(Message::text(leave)).await.unwrap();
        }
        tx.flush().await.unwrap();
        tx
    });
    wait_until(|| frames.load(Ordering::Relaxed) > 2_000).await;

    // Meanwhile a legitimate client joins a topic this node has not subscribed yet.
    let mut ws = connect(a.addr).await;
    let t0 = std::time::Instant::now();
    let r = join(&mut ws, "1", "room:legit", "{}").await;
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the join took {took:?} behind another connection's flood"
    );
    assert!(r["position"].is_string(), "{r}");
    publish(a.addr, "room:legit", "n", "1").await;
    assert_eq!(recv(&mut ws).await[4], 1);

    // The flooding connection lives on: it was refused with a reason, not cut off.
    let mut tx = flood.await.unwrap();
    tx.send(Message::text(r#"[null,"hb","phoenix","heartbeat",{}]"#))
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(DEADLINE * 3, reader)
            .await
            .expect("no heartbeat reply")
            .unwrap()
    );
    let reason = refused
        .lock()
        .unwrap()
        .clone()
        .expect("no join was refused");
    assert!(reason.contains("in progress"), "{reason}");
    assert!(metric(a.addr, "pushgate_refusals_total{cause=\"rate_limit\"}").await >= Some(1.0));
}

#[tokio::test]
async fn joins_completed_together_each_get_their_own_history() {
    let redis = RedisServer::start();
    let a = node(&redis).await;
    let b = node(&redis).await;
    // Twenty topics with different histories, published on A.
    let mut since = Vec::new();
    for t in 0..20 {
        let topic = format!("room:batch{t}");
        since.push(publish(a.addr, &topic, "n", "0").await);
        for n in 1..=t {
            publish(a.addr, &topic, "n", &n.to_string()).await;
        }
    }
    // Twenty clients on B send their joins at once (B has none of these topics yet), so the
    // broker completes them together; one more joins without `since`.
    let mut clients = Vec::new();
    for (t, p) in since.iter().enumerate() {
        let mut ws = connect(b.addr).await;
        let params = format!(r#"{{"since":"{p}"}}"#);
        let topic = format!("room:batch{t}");
        send(
            &mut ws,
            &format!(r#"["1","1","{topic}","phx_join",{params}]"#),
        )
        .await;
        clients.push((t, topic, ws));
    }
    for (t, topic, ws) in &mut clients {
        let reply = recv(ws).await;
        assert_eq!(reply[2], topic.as_str(), "{reply}");
        assert_eq!(reply[4]["status"], "ok", "{reply}");
        assert_eq!(reply[4]["response"]["recovered"], true, "{reply}");
        for n in 1..=*t {
            let m = recv(ws).await;
            assert_eq!(
                (m[2].as_str(), &m[4]),
                (Some(topic.as_str()), &n.into()),
                "{m}"
            );
        }
    }
    // Live messages follow on every topic, without a duplicate at the seam.
    for (t, topic, _) in &clients {
        publish(a.addr, topic, "n", &(t + 100).to_string()).await;
    }
    for (t, _, ws) in &mut clients {
        assert_eq!(recv(ws).await[4], *t + 100);
    }
}

/// `rediss://` with a password, to a real `redis-server` with TLS only, its certificate from a
/// private CA (`redis.tls_ca_file`). A node without that CA must not connect (the certificate
/// is verified). Client certificates (mutual TLS) and TLS with Sentinel are not tested.
#[tokio::test]
async fn a_tls_redis_with_a_password_and_a_private_ca() {
    let ca = TestCa::new(&["127.0.0.1", "localhost"]);
    let dir = std::env::temp_dir().join(format!(
        "pushgate-test-redis-tls-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    struct Cleanup(std::path::PathBuf, Option<std::process::Child>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some(mut c) = self.1.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let mut cleanup = Cleanup(dir.clone(), None);
    let file = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().to_string()
    };
    let (ca_file, cert, key) = (
        file("ca.pem", &ca.ca_pem),
        file("cert.pem", &ca.cert_pem),
        file("key.pem", &ca.key_pem),
    );
    let (child, port) = spawn_on_free_port("redis-server (TLS)", |port| {
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args(["--tls-cert-file", &cert, "--tls-key-file", &key])
        .args(["--tls-ca-cert-file", &ca_file, "--tls-auth-clients", "no"])
        .args([
            "--requirepass",
            "s3cret",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        cmd
    });
    cleanup.1 = Some(child);
    let port = port.to_string();
    let ping = || {
        let out = std::process::Command::new("redis-cli")
            .args(["--tls", "--cacert", &ca_file, "-p", &port, "-a", "s3cret"])
            .args(["--no-auth-warning", "ping"])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim() == "PONG"
    };
    let end = std::time::Instant::now() + DEADLINE;
    while !ping() {
        assert!(
            std::time::Instant::now() < end,
            "redis-server with TLS did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let url = format!("rediss://:s3cret@127.0.0.1:{port}/");
    let mut c = redis_config(&url);
    c.redis.tls_ca_file = ca_file.clone();
    let a = start_with(c).await;
    wait_ready(a.addr, 200).await;
    let mut ws = connect(a.addr).await;
    join(&mut ws, "1", "room:tls", "{}").await;
    let p = publish(a.addr, "room:tls", "n", "1").await;
    let m = recv(&mut ws).await;
    assert_eq!(
        (m[1].as_str(), &m[4]),
        (Some(p.as_str()), &serde_json::json!(1))
    );

    // Without the CA the certificate is not trusted: the node never gets ready.
    let b = start_with(redis_config(&url)).await;
    readyz_reports_cannot_connect(b.addr, "connected without trusting the certificate").await;
}

/// A LongPoll session on `b`, joined to `topic`, whose next poll is relayed by `a` and held at
/// `b`: returns the client's acknowledged token and the relayed poll's task.
async fn relayed_poll_held_at_owner(
    a: &TestServer,
    b: &TestServer,
    topic: &str,
) -> (String, tokio::task::JoinHandle<serde_json::Value>) {
    let (token, _) = lp_session(b.addr).await;
    let join = format!(r#"["1","1","{topic}","phx_join",{{}}]"#);
    let r = lp(b.addr, "POST", &lp_url(&token), join.as_bytes()).await;
    assert_eq!(r["status"], 200);
    let v = lp(b.addr, "GET", &lp_url(&token), b"").await;
    assert_eq!(frames(&v)[0][3], "phx_reply", "{v}");
    let acked = v["token"].as_str().unwrap().to_string();
    let relayed = {
        let acked = acked.clone();
        let via = a.addr;
        tokio::spawn(async move { lp(via, "GET", &lp_url(&acked), b"").await })
    };
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while b.app.longpoll.held() != 1 {
        assert!(
            tokio::time::Instant::now() < end,
            "the relayed poll never reached B"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (acked, relayed)
}

/// A node that relays a LongPoll GET for another node's session and starts draining cuts the
/// poll short (`204` with the client's own token, so the client polls again elsewhere), and
/// finishes in about `shutdown.drain_ms`, not its grace period. The session lives on at its
/// owner, which answers the next poll with what was published meanwhile. (Before, the relayed
/// poll held the draining node until the window ended.)
#[tokio::test]
async fn a_draining_node_cuts_short_the_polls_it_relays_and_finishes_within_its_drain_time() {
    let redis = RedisServer::start();
    let mut c = redis_config(&redis.url());
    c.longpoll.window_ms = 8000;
    c.longpoll.session_timeout_ms = 20_000;
    c.shutdown.drain_ms = 1000;
    c.shutdown.grace_ms = 15_000;
    let a = start_with(c.clone()).await;
    let b = start_with(c).await;
    wait_ready(a.addr, 200).await;
    wait_ready(b.addr, 200).await;

    // A session on B, joined; its next poll goes through A.
    let (acked, relayed) = relayed_poll_held_at_owner(&a, &b, "room:drain").await;

    let t0 = std::time::Instant::now();
    a.stop.cancel();
    let answer = tokio::time::timeout(Duration::from_secs(15), relayed)
        .await
        .expect("the relayed poll was not answered")
        .unwrap();
    let answered_after = t0.elapsed();
    assert!(
        tokio::time::timeout(Duration::from_secs(15), a.handle)
            .await
            .unwrap()
            .unwrap()
    );
    let drained_after = t0.elapsed();
    assert_eq!(
        answer,
        serde_json::json!({"status": 204, "token": acked, "messages": []}),
        "cut short with the client's own token"
    );
    assert!(
        drained_after < Duration::from_millis(2000),
        "the drain took {drained_after:?} (relayed poll answered after {answered_after:?}); \
         shutdown.drain_ms is 1000"
    );

    // The client polls again, now on B: the session is there, with what was published since.
    let p = publish(b.addr, "room:drain", "n", "1").await;
    let v = lp(b.addr, "GET", &lp_url(&acked), b"").await;
    assert_eq!(
        frames(&v),
        vec![serde_json::json!([null, p, "room:drain", "n", 1])],
        "{v}"
    );
}

/// A relayed LongPoll GET whose relaying node loses its Redis subscriber connection (where the
/// owner's answer would arrive) is cut short at once with the client's own token, and the
/// session goes on: the next poll, on the owner, gets what was published meanwhile. (Before,
/// the relaying node waited for an answer that could no longer come, up to the window.)
#[tokio::test]
async fn a_relayed_poll_is_cut_short_when_the_relaying_node_loses_its_redis_link() {
    let redis = RedisServer::start();
    let mut c = redis_config(&redis.url());
    c.longpoll.window_ms = 8000;
    c.longpoll.session_timeout_ms = 20_000;
    let a = start_with(c.clone()).await;
    let b = start_with(c).await;
    wait_ready(a.addr, 200).await;
    wait_ready(b.addr, 200).await;

    let (acked, relayed) = relayed_poll_held_at_owner(&a, &b, "room:link").await;

    let t0 = std::time::Instant::now();
    assert!(
        !redis
            .cli(&["CLIENT", "KILL", "TYPE", "pubsub"])
            .contains("ERR")
    );
    let answer = tokio::time::timeout(Duration::from_secs(15), relayed)
        .await
        .expect("the relayed poll was not answered")
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(
        answer,
        serde_json::json!({"status": 204, "token": acked, "messages": []}),
        "cut short with the client's own token"
    );
    assert!(
        took < Duration::from_millis(2000),
        "answered after {took:?}"
    );

    wait_ready(b.addr, 200).await;
    let p = publish(b.addr, "room:link", "n", "1").await;
    let v = lp(b.addr, "GET", &lp_url(&acked), b"").await;
    assert_eq!(
        frames(&v),
        vec![serde_json::json!([null, p, "room:link", "n", 1])],
        "{v}"
    );
}

/// With the Redis broker, `pushgate_delivery_seconds` times deliveries from each message's
/// receipt from Redis, on every node that delivers it (issue 22).
#[tokio::test]
async fn delivery_times_are_observed_from_redis_receipt_on_each_node() {
    let redis = RedisServer::start();
    let nodes = [node(&redis).await, node(&redis).await];
    let mut clients = Vec::new();
    for n in &nodes {
        let mut ws = connect(n.addr).await;
        join(&mut ws, "1", "room:timed", "{}").await;
        clients.push(ws);
    }
    publish(nodes[0].addr, "room:timed", "e", "1").await;
    for ws in &mut clients {
        assert_eq!(recv(ws).await[4], 1);
    }
    for n in &nodes {
        let sample = r#"pushgate_delivery_seconds_count{from="redis"}"#;
        let end = tokio::time::Instant::now() + Duration::from_secs(10);
        while metric(n.addr, sample).await != Some(1.0) {
            assert!(
                tokio::time::Instant::now() < end,
                "{sample} never reached 1"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            metric(n.addr, r#"pushgate_delivery_seconds_count{from="publish"}"#).await,
            Some(0.0)
        );
    }
}

/// Issue 20, bug 1 (SOAK.md, "a node behind the client"): a node that is live on a topic but has
/// not received its newest message yet (here: a backend's publish whose `PUBLISH` reached no
/// node; in production, any node a few milliseconds behind another) is behind a client whose
/// `since` is that message. The node reads what it lacks from the stream before it answers, so
/// the join is recovered, the node's own subscribers get the message too, and nothing comes
/// twice. A `since` ahead of Redis itself is still not recovered.
#[tokio::test]
async fn a_node_behind_the_client_catches_up_from_the_stream_before_answering() {
    let redis = RedisServer::start();
    let a = node(&redis).await;
    let mut first = connect(a.addr).await;
    join(&mut first, "1", "room:lag", "{}").await;
    let pos = publish_lua(
        &redis,
        "room:lag",
        "pushgate:a channel no node listens to",
        r#"{"n":1}"#,
    );
    let pos = pos.trim();
    let mut ws = connect(a.addr).await;
    let r = join(&mut ws, "2", "room:lag", &format!(r#"{{"since":"{pos}"}}"#)).await;
    assert_eq!(r["recovered"], true, "{r}");
    assert_eq!(r["position"], pos, "{r}");
    let m = recv(&mut first).await;
    assert_eq!(
        m[1], pos,
        "the node's live subscriber gets what the node had missed"
    );
    let p2 = publish(a.addr, "room:lag", "m", r#"{"n":2}"#).await;
    assert_eq!(
        recv(&mut ws).await[1],
        p2.as_str(),
        "nothing replayed twice"
    );
    assert_eq!(recv(&mut first).await[1], p2.as_str());
    // Ahead of Redis too: the client's word is not taken.
    let (epoch, offset) = split_position(&p2);
    let ahead = format!("{epoch}:{}", offset + 5);
    let mut third = connect(a.addr).await;
    let r = join(
        &mut third,
        "3",
        "room:lag",
        &format!(r#"{{"since":"{ahead}"}}"#),
    )
    .await;
    assert_eq!(r["recovered"], false, "{r}");
}
