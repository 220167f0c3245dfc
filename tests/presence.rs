//! Phoenix Presence (`[presence]`, src/presence.rs), frame by frame: `presence_state` to the
//! joiner, `presence_diff` broadcasts as channels join and leave, keys from connect tokens, bad
//! metas refused; and with the Redis broker across nodes, a dead node's entries removed, a
//! restarted Redis refilled. tests/js/presence.test.js runs phoenix.js's `Presence` against it.

mod support;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::net::SocketAddr;
use support::*;

const SECRET: &str = "a-connect-token-secret-of-32-bytes!";

fn presence_config() -> pushgate::config::Config {
    let mut c = test_config();
    c.presence.topics = vec!["room:*".into()];
    c
}

/// The next frame, which must be `event` on `topic`; returns its payload.
async fn expect_event(ws: &mut Ws, topic: &str, event: &str) -> Value {
    let m = recv(ws).await;
    assert_eq!(
        (m[2].as_str(), m[3].as_str()),
        (Some(topic), Some(event)),
        "{m}"
    );
    m[4].clone()
}

/// The keys of a state (or a diff's joins/leaves), each with its metas' `name`s.
fn names(state: &Value) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = state
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {state}"))
        .iter()
        .map(|(k, v)| {
            let metas = v["metas"].as_array().unwrap_or_else(|| panic!("{v}"));
            let mut n: Vec<String> = metas
                .iter()
                .map(|m| m["name"].as_str().unwrap_or("").to_string())
                .collect();
            n.sort();
            (k.clone(), n)
        })
        .collect();
    out.sort();
    out
}

fn only_names(state: &Value) -> Vec<String> {
    let mut n: Vec<String> = names(state).into_iter().flat_map(|(_, n)| n).collect();
    n.sort();
    n
}

/// Joins `topic` as `name`; checks the reply, then returns the `presence_state` payload and the
/// own join's diff.
async fn join_as(ws: &mut Ws, join_ref: &str, topic: &str, name: &str) -> (Value, Value) {
    join(
        ws,
        join_ref,
        topic,
        &format!(r#"{{"presence":{{"name":"{name}"}}}}"#),
    )
    .await;
    let state = recv(ws).await;
    assert_eq!(
        state[0], join_ref,
        "presence_state goes to the channel: {state}"
    );
    assert_eq!(state[3], "presence_state", "{state}");
    let diff = expect_event(ws, topic, "presence_diff").await;
    assert_eq!(only_names(&diff["joins"]), [name], "{diff}");
    assert_eq!(diff["leaves"], json!({}), "{diff}");
    (state[4].clone(), diff)
}

#[tokio::test]
async fn joins_and_leaves_are_announced_to_everyone_on_the_topic() {
    let s = start_with(presence_config()).await;
    let mut ann = connect(s.addr).await;
    let (state, diff) = join_as(&mut ann, "1", "room:1", "Ann").await;
    assert_eq!(state, json!({}));
    let (key, meta) = diff["joins"].as_object().unwrap().iter().next().unwrap();
    assert_eq!(
        meta["metas"][0]["phx_ref"],
        key.as_str(),
        "anonymous: keyed by its phx_ref"
    );
    assert!(meta["metas"][0]["online_at"].as_u64().unwrap() > 1_600_000_000_000);

    let mut bob = connect(s.addr).await;
    let (state, _) = join_as(&mut bob, "1", "room:1", "Bob").await;
    assert_eq!(only_names(&state), ["Ann"], "{state}");
    let diff = expect_event(&mut ann, "room:1", "presence_diff").await;
    assert_eq!(only_names(&diff["joins"]), ["Bob"], "{diff}");
    assert_eq!(metric(s.addr, "pushgate_presence_entries").await, Some(2.0));

    // A leave, then a connection that goes away.
    send(&mut bob, r#"["1","2","room:1","phx_leave",{}]"#).await;
    assert_eq!(recv(&mut bob).await[3], "phx_reply");
    assert_eq!(recv(&mut bob).await[3], "phx_close");
    let diff = expect_event(&mut ann, "room:1", "presence_diff").await;
    assert_eq!(diff["joins"], json!({}), "{diff}");
    assert_eq!(only_names(&diff["leaves"]), ["Bob"], "{diff}");
    join_as(&mut bob, "3", "room:1", "Bob").await;
    expect_event(&mut ann, "room:1", "presence_diff").await;
    drop(bob);
    bob_left_and_cy_sees_only_ann(&mut ann, s.addr, "room:1").await;
}

/// Ann hears that Bob left `topic`; a newcomer (Cy) on `addr` then finds only Ann there.
async fn bob_left_and_cy_sees_only_ann(ann: &mut Ws, addr: SocketAddr, topic: &str) {
    let diff = expect_event(ann, topic, "presence_diff").await;
    assert_eq!(only_names(&diff["leaves"]), ["Bob"], "{diff}");
    let mut cy = connect(addr).await;
    let (state, _) = join_as(&mut cy, "1", topic, "Cy").await;
    assert_eq!(only_names(&state), ["Ann"], "{state}");
}

#[tokio::test]
async fn a_storm_of_joins_is_announced_exactly_once_each() {
    let s = start_with(presence_config()).await;
    let mut watcher = connect(s.addr).await;
    join_as(&mut watcher, "1", "room:storm", "Watcher").await;
    // 50 joins at once (no waiting for replies): changes that queue up together are announced
    // together, and every one exactly once.
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(connect(s.addr).await);
    }
    for (n, ws) in clients.iter_mut().enumerate() {
        let params = format!(r#"{{"presence":{{"name":"c{n:02}"}}}}"#);
        send(
            ws,
            &format!(r#"["1","1","room:storm","phx_join",{params}]"#),
        )
        .await;
    }
    let mut joined = Vec::new();
    let mut diffs = 0;
    while joined.len() < 50 {
        let diff = expect_event(&mut watcher, "room:storm", "presence_diff").await;
        assert_eq!(diff["leaves"], json!({}), "{diff}");
        joined.extend(only_names(&diff["joins"]));
        diffs += 1;
    }
    joined.sort();
    let want: Vec<String> = (0..50).map(|n| format!("c{n:02}")).collect();
    assert_eq!(joined, want);
    assert!(
        diffs < 50,
        "joins that queued together were announced one by one"
    );
    // All at once away: every one leaves, exactly once.
    drop(clients);
    let mut left = Vec::new();
    while left.len() < 50 {
        let diff = expect_event(&mut watcher, "room:storm", "presence_diff").await;
        left.extend(only_names(&diff["leaves"]));
    }
    left.sort();
    assert_eq!(left, want);
}

#[tokio::test]
async fn other_topics_get_no_presence_and_bad_metas_are_refused() {
    let s = start_with(presence_config()).await;
    let mut ws = connect(s.addr).await;
    join(&mut ws, "1", "lobby", r#"{"presence":{"name":"Ann"}}"#).await;
    publish(s.addr, "lobby", "hello", "1").await;
    let m = recv(&mut ws).await;
    assert_eq!(m[3], "hello", "no presence frames on other topics: {m}");

    for (params, says) in [
        (r#"{"presence":"Ann"}"#.to_string(), "must be a JSON object"),
        (r#"{"presence":[1]}"#.to_string(), "must be a JSON object"),
        (
            format!(r#"{{"presence":{{"name":"{}"}}}}"#, "x".repeat(600)),
            "presence.max_meta_bytes",
        ),
    ] {
        let reply = join_reply(&mut ws, "2", "room:1", &params).await;
        assert_eq!(reply["status"], "error", "{reply}");
        let reason = reply["response"]["reason"].as_str().unwrap();
        assert!(reason.contains(says), "{reason:?} should say {says:?}");
    }
    // The connection and its channel carry on; a forged phx_ref is overwritten.
    join(
        &mut ws,
        "3",
        "room:1",
        r#"{"presence":{"phx_ref":"mine","n":1}}"#,
    )
    .await;
    assert_eq!(
        expect_event(&mut ws, "room:1", "presence_state").await,
        json!({})
    );
    let diff = expect_event(&mut ws, "room:1", "presence_diff").await;
    let meta = diff["joins"].as_object().unwrap().values().next().unwrap()["metas"][0].clone();
    assert_ne!(meta["phx_ref"], "mine", "{meta}");
    assert_eq!(meta["n"], 1, "{meta}");
    publish(s.addr, "lobby", "still", "2").await;
    assert_eq!(recv(&mut ws).await[3], "still");
}

fn token(sub: &str) -> String {
    let exp = jsonwebtoken::get_current_timestamp() + 600;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"exp": exp, "sub": sub}),
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

async fn connect_with_token(addr: SocketAddr, token: &str) -> Ws {
    let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0&token={token}");
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

#[tokio::test]
async fn a_verified_token_s_subject_is_the_key() {
    let mut c = presence_config();
    c.auth.secret = SECRET.into();
    let s = start_with(c).await;
    let mut phone = connect_with_token(s.addr, &token("alice")).await;
    let (_, diff) = join_as(&mut phone, "1", "room:2", "phone").await;
    assert_eq!(
        names(&diff["joins"]),
        [("alice".into(), vec!["phone".into()])]
    );
    let mut laptop = connect_with_token(s.addr, &token("alice")).await;
    let (state, _) = join_as(&mut laptop, "1", "room:2", "laptop").await;
    assert_eq!(names(&state), [("alice".into(), vec!["phone".into()])]);
    // A token that does not verify makes no claim: anonymous.
    let forged = format!("{}x", token("bob"));
    let mut other = connect_with_token(s.addr, &forged).await;
    let (state, diff) = join_as(&mut other, "1", "room:2", "other").await;
    assert_eq!(
        names(&state),
        [("alice".into(), vec!["laptop".into(), "phone".into()])]
    );
    assert_ne!(names(&diff["joins"])[0].0, "bob");
}

/// `GET /api/presence?topic=...` with the publish token: (status, body as JSON).
async fn api_presence(addr: SocketAddr, query: &str) -> (u16, Value) {
    let auth = format!("Bearer {TOKEN}");
    let (status, _, body) = http(
        addr,
        "GET",
        &format!("/api/presence{query}"),
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    (status, body_json(&body))
}

#[tokio::test]
async fn the_app_asks_who_is_on_a_topic() {
    let s = start_with(presence_config()).await;
    let (status, body) = api_presence(s.addr, "?topic=room%3A5").await;
    assert_eq!(
        (status, &body),
        (200, &json!({"topic": "room:5", "presences": {}}))
    );
    let mut ann = connect(s.addr).await;
    let (_, diff) = join_as(&mut ann, "1", "room:5", "Ann").await;
    let (status, body) = api_presence(s.addr, "?topic=room:5").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["presences"], diff["joins"],
        "the same entry the clients were told of"
    );

    for (query, want, says) in [
        ("", 400, "missing topic"),
        ("?topic=", 400, "missing topic"),
        ("?topic=lobby", 404, "presence.topics"),
    ] {
        let (status, body) = api_presence(s.addr, query).await;
        assert_eq!(status, want, "{query}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(says),
            "{query}: {body}"
        );
    }
    let (status, head, _) = http(s.addr, "GET", "/api/presence?topic=room:5", &[], b"").await;
    assert_eq!(status, 401);
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{head}"
    );
    let auth = format!("Bearer {TOKEN}");
    let (status, head, _) = http(
        s.addr,
        "POST",
        "/api/presence?topic=room:5",
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(status, 405);
    assert!(head.to_ascii_lowercase().contains("allow: get"), "{head}");

    // Without presence configured, no topic is a presence topic.
    let plain = start().await;
    assert_eq!(api_presence(plain.addr, "?topic=room:5").await.0, 404);
}

async fn node(redis: &RedisServer, ttl_ms: u64) -> TestServer {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("pushgate=debug")
            .with_test_writer()
            .try_init();
    }
    let mut c = redis_config(&redis.url());
    c.presence.topics = vec!["room:*".into()];
    c.presence.node_ttl_ms = ttl_ms;
    let s = start_with(c).await;
    wait_ready(s.addr, 200).await;
    s
}

/// Two nodes on one Redis (a TTL of 60 s) with Ann joined to `topic` on node A, then Bob on
/// node B; returns them with Bob's `presence_state`.
async fn ann_on_a_bob_on_b(topic: &str) -> (RedisServer, TestServer, TestServer, Ws, Ws, Value) {
    let redis = RedisServer::start();
    let a = node(&redis, 60_000).await;
    let b = node(&redis, 60_000).await;
    let mut ann = connect(a.addr).await;
    join_as(&mut ann, "1", topic, "Ann").await;
    let mut bob = connect(b.addr).await;
    let (state, _) = join_as(&mut bob, "1", topic, "Bob").await;
    (redis, a, b, ann, bob, state)
}

#[tokio::test]
async fn with_redis_every_node_sees_everyone_and_a_stopped_node_s_entries_leave() {
    let (_redis, a, b, mut ann, _bob, state) = ann_on_a_bob_on_b("room:r").await;
    assert_eq!(only_names(&state), ["Ann"], "node B reads node A's entries");
    let diff = expect_event(&mut ann, "room:r", "presence_diff").await;
    assert_eq!(only_names(&diff["joins"]), ["Bob"], "{diff}");
    // Either node tells the app about both.
    for n in [&a, &b] {
        let (status, body) = api_presence(n.addr, "?topic=room:r").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(only_names(&body["presences"]), ["Ann", "Bob"], "{body}");
    }

    // Node B stops: its entries leave at once, long before the TTL.
    b.stop.cancel();
    bob_left_and_cy_sees_only_ann(&mut ann, a.addr, "room:r").await;
}

/// What a node that died leaves behind: an entry of node `deadbeef` ("Ghost") on `topic`, its
/// topic list and its place in the node set, no liveness key.
fn leave_a_dead_node_s_entry(redis: &RedisServer, topic: &str) {
    let ghost =
        r#"{"key":"ghost","node":"deadbeef","meta":{"phx_ref":"deadbeef-1","name":"Ghost"}}"#;
    redis.cli(&[
        "HSET",
        &format!("pushgate:{{{topic}}}:p"),
        "deadbeef-1",
        ghost,
    ]);
    redis.cli(&["SADD", "pushgate.internal:presence:node:deadbeef", topic]);
    redis.cli(&["SADD", "pushgate.internal:presence:nodes", "deadbeef"]);
}

#[tokio::test]
async fn with_redis_a_dead_node_s_entries_are_removed_and_announced() {
    let redis = RedisServer::start();
    leave_a_dead_node_s_entry(&redis, "room:g");
    // A live node with a long TTL, so it reaps from its first beats at the latest.
    let a = node(&redis, 900).await;
    let mut ann = connect(a.addr).await;
    join(&mut ann, "1", "room:g", r#"{"presence":{"name":"Ann"}}"#).await;
    // The ghost is in the state unless it was already reaped; either way its leave or its
    // absence is all Ann ever sees of it afterwards.
    let state = expect_event(&mut ann, "room:g", "presence_state").await;
    let mut seen_leave = !only_names(&state).contains(&"Ghost".to_string());
    let mut own_join = false;
    while !(seen_leave && own_join) {
        let diff = expect_event(&mut ann, "room:g", "presence_diff").await;
        if only_names(&diff["leaves"]) == ["Ghost"] {
            seen_leave = true;
        }
        if only_names(&diff["joins"]) == ["Ann"] {
            own_join = true;
        }
    }
    wait_until(|| redis.cli(&["HLEN", "pushgate:{room:g}:p"]).trim() == "1").await;
    assert_eq!(
        redis
            .cli(&["SISMEMBER", "pushgate.internal:presence:nodes", "deadbeef"])
            .trim(),
        "0"
    );
    // Exactly the one ghost entry was reaped, and counted (the count follows the removal).
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let reaped = metric(a.addr, "pushgate_presence_reaped_total").await;
        if reaped == Some(1.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end && reaped.is_some_and(|n| n < 1.0),
            "pushgate_presence_reaped_total: {reaped:?}, want 1"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Issue 20, soak bug 2: reaping a dead node is all or nothing. A reaper whose Redis commands
/// fail half way (here: an ACL that refuses it HDEL; in the soak, a reaper SIGTERMed, or Redis
/// restarted, while reaping) must leave the dead node where the next reaper finds it. Before,
/// the reaper took the node out of the node set first (`SREM`, which decided the winner) and
/// then failed, leaving its entries behind for good: a ghost every node kept showing.
#[tokio::test]
async fn a_reap_that_fails_half_way_leaves_the_dead_node_for_the_next() {
    let redis = RedisServer::start();
    leave_a_dead_node_s_entry(&redis, "room:h");
    redis.cli(&[
        "ACL", "SETUSER", "reaper", "on", ">pw", "~*", "&*", "+@all", "-hdel",
    ]);
    let mut c = redis_config(&format!("redis://reaper:pw@127.0.0.1:{}/", redis.port));
    c.presence.topics = vec!["room:*".into()];
    c.presence.node_ttl_ms = 900;
    let a = start_with(c).await;
    wait_ready(a.addr, 200).await;
    // The node tried to reap and was refused HDEL (Redis's ACL log says so).
    wait_until(|| redis.cli(&["ACL", "LOG"]).contains("hdel")).await;
    // Nothing of the dead node is gone: neither its entry nor its place in the node set.
    assert_eq!(redis.cli(&["HLEN", "pushgate:{room:h}:p"]).trim(), "1");
    assert_eq!(
        redis
            .cli(&["SISMEMBER", "pushgate.internal:presence:nodes", "deadbeef"])
            .trim(),
        "1",
        "a failed reap must not take the dead node out of the node set"
    );
    // Once Redis lets it, a later beat reaps the node.
    redis.cli(&["ACL", "SETUSER", "reaper", "+hdel"]);
    wait_until(|| redis.cli(&["HLEN", "pushgate:{room:h}:p"]).trim() == "0").await;
    wait_until(|| {
        redis
            .cli(&["SISMEMBER", "pushgate.internal:presence:nodes", "deadbeef"])
            .trim()
            == "0"
    })
    .await;
}

#[tokio::test]
async fn with_redis_a_restarted_redis_gets_the_entries_back() {
    let mut redis = RedisServer::start();
    let a = node(&redis, 900).await;
    let mut ann = connect(a.addr).await;
    join_as(&mut ann, "1", "room:x", "Ann").await;
    redis.restart(); // no persistence: every entry is gone
    wait_ready(a.addr, 200).await;
    // Within a beat or two the node notices its liveness key is gone and writes its entries
    // back; a newcomer then sees Ann.
    wait_until(|| redis.cli(&["HLEN", "pushgate:{room:x}:p"]).trim() == "1").await;
    let mut bob = connect(a.addr).await;
    let (state, _) = join_as(&mut bob, "1", "room:x", "Bob").await;
    assert_eq!(only_names(&state), ["Ann"], "{state}");
}

#[tokio::test]
async fn with_redis_the_api_says_when_redis_does_not_answer() {
    let redis = RedisServer::start();
    let a = node(&redis, 60_000).await;
    assert_eq!(api_presence(a.addr, "?topic=room:p").await.0, 200);
    redis.pause();
    let (status, body) = api_presence(a.addr, "?topic=room:p").await;
    redis.resume();
    assert_eq!(status, 503, "{body}");
    assert!(!body["error"].as_str().unwrap().is_empty(), "{body}");
    let end = tokio::time::Instant::now() + DEADLINE;
    while api_presence(a.addr, "?topic=room:p").await.0 != 200 {
        assert!(
            tokio::time::Instant::now() < end,
            "the API never answered again"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn with_redis_down_nothing_waits_and_what_changed_meanwhile_is_announced_after() {
    let (redis, a, b, ann, mut bob, _) = ann_on_a_bob_on_b("room:d").await;
    redis.pause();
    wait_ready(a.addr, 503).await;
    // The API says so at once instead of waiting on Redis.
    let started = tokio::time::Instant::now();
    let (status, body) = api_presence(a.addr, "?topic=room:d").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // Ann leaves while Redis is away; once it is back, Bob hears of it.
    drop(ann);
    wait_until(|| s_entries(&a) == 0).await;
    redis.resume();
    loop {
        let diff = expect_event(&mut bob, "room:d", "presence_diff").await;
        if only_names(&diff["leaves"]) == ["Ann"] {
            break;
        }
    }
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, body) = api_presence(b.addr, "?topic=room:d").await;
        if status == 200 && only_names(&body["presences"]) == ["Bob"] {
            break;
        }
        assert!(tokio::time::Instant::now() < end, "{status} {body}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The presence entries node `s` tracks.
fn s_entries(s: &TestServer) -> u64 {
    s.app
        .metrics
        .presence_entries
        .load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test]
async fn a_state_redis_could_not_give_is_completed_once_it_can() {
    let redis = RedisServer::start();
    let a = node(&redis, 60_000).await;
    // A key of the wrong type: Redis answers every read and write of this topic with an error.
    redis.cli(&["SET", "pushgate:{room:w}:p", "not a hash"]);
    let mut ann = connect(a.addr).await;
    join(&mut ann, "1", "room:w", r#"{"presence":{"name":"Ann"}}"#).await;
    let state = expect_event(&mut ann, "room:w", "presence_state").await;
    assert_eq!(state, json!({}), "what the node knows without Redis");
    redis.cli(&["DEL", "pushgate:{room:w}:p"]);
    // Within a beat: Ann's entry is written back and she gets the complete state.
    loop {
        let m = recv(&mut ann).await;
        if m[3] == "presence_state" {
            assert_eq!(m[0], "1", "{m}");
            assert_eq!(only_names(&m[4]), ["Ann"], "{m}");
            break;
        }
        assert_eq!(m[3], "presence_diff", "{m}");
    }
    assert_eq!(redis.cli(&["HLEN", "pushgate:{room:w}:p"]).trim(), "1");
}

#[tokio::test]
async fn with_redis_topics_named_like_internal_keys_leave_no_ghosts() {
    let redis = RedisServer::start();
    let mut c = redis_config(&redis.url());
    c.presence.topics = vec!["*".into()];
    c.presence.node_ttl_ms = 60_000;
    let a = start_with(c.clone()).await;
    let b = start_with(c).await;
    wait_ready(a.addr, 200).await;
    wait_ready(b.addr, 200).await;
    // Node A's id is in every LongPoll token it hands out.
    let (_, _, body) = http(a.addr, "GET", "/socket/longpoll?vsn=2.0.0&", &[], b"").await;
    let token = body_json(&body)["token"].as_str().unwrap().to_string();
    let id_a = &token[2..10];
    // A hostile client on B takes presence on topics named like A's internal keys, and stays.
    let mut hostile = connect(b.addr).await;
    for (i, topic) in [format!("node:{id_a}"), "nodes".to_string()]
        .iter()
        .enumerate()
    {
        join_as(&mut hostile, &i.to_string(), topic, "H").await;
    }
    let mut ann = connect(a.addr).await;
    join_as(&mut ann, "1", "room:1", "Ann").await;
    // Node A stops: Ann's entry leaves with it, and B does not show her as a ghost.
    a.stop.cancel();
    assert!(a.handle.await.unwrap());
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, body) = api_presence(b.addr, "?topic=room:1").await;
        if status == 200 && only_names(&body["presences"]).is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "a ghost on node B: {status} {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
