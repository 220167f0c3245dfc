//! `POST /api/publish` and the operational endpoints, exactly as DESIGN.md §2 pins them.

mod support;

use base64::Engine;
use serde_json::{Value, json};
use support::*;

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

fn item(topic: &str, event: &str, payload: Value) -> Value {
    json!({"topic": topic, "event": event, "payload": payload})
}

/// Posts `body` (JSON) with the right token.
async fn post(s: &TestServer, body: &Value) -> (u16, Value) {
    let (status, _, v) = post_publish(s.addr, Some(&bearer()), body.to_string().as_bytes()).await;
    (status, v)
}

/// Asserts a 4xx JSON error and returns its message.
#[track_caller]
fn error_message(status: u16, want: u16, head: &str, v: &Value) -> String {
    assert_eq!(status, want, "{v}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let obj = v.as_object().unwrap_or_else(|| panic!("JSON object: {v}"));
    assert_eq!(obj.len(), 1, "only an error field: {v}");
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("error string: {v}"));
    assert!(!msg.is_empty());
    msg.to_string()
}

/// Posts raw bytes with the right token; asserts a JSON error with `want` and returns it.
async fn rejected(s: &TestServer, body: &[u8], want: u16) -> String {
    let (status, head, v) = post_publish(s.addr, Some(&bearer()), body).await;
    error_message(status, want, &head, &v)
}

/// A subscriber on `topic`, with the topic's current position.
async fn subscriber(s: &TestServer, topic: &str) -> (Ws, String, u64) {
    let mut ws = connect(s.addr).await;
    let resp = join(&mut ws, "1", topic, "{}").await;
    let (epoch, offset) = split_position(resp["position"].as_str().unwrap());
    (ws, epoch, offset)
}

/// Nothing was published to the subscriber's topic since `offset`: the next good message gets
/// `offset + 1` and is the first thing the subscriber receives.
async fn assert_nothing_published(s: &TestServer, ws: &mut Ws, topic: &str, offset: u64) {
    let pos = publish(s.addr, topic, "probe", r#""probe""#).await;
    assert_eq!(split_position(&pos).1, offset + 1, "the position moved");
    let m = recv(ws).await;
    assert_eq!(
        m[3], "probe",
        "something was delivered before the probe: {m}"
    );
    assert_eq!(m[1], pos.as_str());
}

#[tokio::test]
async fn a_single_message_gets_its_position_and_is_delivered() {
    let s = start().await;
    let (mut ws, epoch, start_offset) = subscriber(&s, "room:lobby").await;
    assert_eq!(start_offset, 0);

    let payload = json!({"body": "hi", "n": [1, 2.5, null, true], "s": "é\"\\"});
    let (status, head, v) = post_publish(
        s.addr,
        Some(&bearer()),
        item("room:lobby", "new_msg", payload.clone())
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json")
    );
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
    let pos = v["position"].as_str().unwrap().to_string();
    assert_eq!(split_position(&pos), (epoch.clone(), 1));

    let m = recv(&mut ws).await;
    assert_eq!(m, json!([null, pos, "room:lobby", "new_msg", payload]));

    // Offsets increase by one per message, under the same epoch.
    for n in 2..=6u64 {
        let (status, v) = post(&s, &item("room:lobby", "new_msg", json!(n))).await;
        assert_eq!(status, 200);
        assert_eq!(
            split_position(v["position"].as_str().unwrap()),
            (epoch.clone(), n)
        );
        let m = recv(&mut ws).await;
        assert_eq!(m[4], n);
        assert_eq!(m[1], v["position"]);
    }

    // Another topic has a stream of its own.
    let (status, v) = post(&s, &item("room:other", "e", json!(null))).await;
    assert_eq!(status, 200);
    assert_eq!(split_position(v["position"].as_str().unwrap()).1, 1);

    // Any JSON value is a payload, and it arrives exactly as sent.
    for payload in [json!(null), json!(0), json!("text"), json!([]), json!({})] {
        let (status, v) = post(&s, &item("room:lobby", "any", payload.clone())).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(recv(&mut ws).await[4], payload);
    }
    assert_eq!(
        metric_sum(s.addr, "pushgate_messages_published_total").await,
        Some(12.0)
    );
}

#[tokio::test]
async fn a_batch_gets_positions_in_order_and_is_delivered_in_order() {
    let s = start().await;
    let (mut a, epoch_a, _) = subscriber(&s, "room:a").await;
    let (mut b, _, _) = subscriber(&s, "room:b").await;
    let batch = json!([
        item("room:a", "e", json!(0)),
        item("room:a", "e", json!(1)),
        item("room:b", "e", json!(2)),
        item("room:a", "e", json!(3)),
    ]);
    let (status, v) = post(&s, &batch).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
    let positions: Vec<(String, u64)> = v["positions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| split_position(p.as_str().unwrap()))
        .collect();
    assert_eq!(positions.len(), 4);
    assert_eq!(positions[0], (epoch_a.clone(), 1));
    assert_eq!(positions[1], (epoch_a.clone(), 2));
    assert_eq!(positions[2].1, 1, "room:b counts on its own");
    assert_eq!(positions[3], (epoch_a.clone(), 3));

    for (i, n) in [(0, 0), (1, 1), (3, 3)] {
        let m = recv(&mut a).await;
        assert_eq!(m[4], n, "{m}");
        assert_eq!(m[1], v["positions"][i], "{m}");
    }
    let m = recv(&mut b).await;
    assert_eq!(m[4], 2);
    assert_eq!(m[1], v["positions"][2]);

    // A one-item batch is still a batch.
    let (status, v) = post(&s, &json!([item("room:a", "e", json!(4))])).await;
    assert_eq!(status, 200);
    assert_eq!(v["positions"].as_array().unwrap().len(), 1, "{v}");
    assert!(v.get("position").is_none());
    assert_eq!(recv(&mut a).await[4], 4);
}

#[tokio::test]
async fn a_missing_or_wrong_token_gets_401_and_publishes_nothing() {
    let s = start().await;
    let (mut ws, _, offset) = subscriber(&s, "room:auth").await;
    let body = item("room:auth", "e", json!(1)).to_string();
    let basic_user = base64::engine::general_purpose::STANDARD.encode(format!("user:{TOKEN}"));
    let basic_raw = format!("Basic {TOKEN}");
    let basic_user = format!("Basic {basic_user}");
    let short = format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]);
    let long = format!("Bearer {TOKEN}x");
    let bare = TOKEN.to_string();
    let cases: Vec<Option<&str>> = vec![
        None,
        Some("Bearer wrong-token-0123456789"),
        Some(&short),
        Some(&long),
        Some("Bearer "),
        Some("Bearer"),
        Some(&bare),
        Some(&basic_user),
        Some(&basic_raw),
    ];
    for auth in cases {
        let (status, head, v) = post_publish(s.addr, auth, body.as_bytes()).await;
        let msg = error_message(status, 401, &head, &v);
        assert!(!msg.contains(TOKEN), "the error must not reveal the token");
    }
    // The token in the query string is not a credential either.
    let (status, _, _) = try_http(
        s.addr,
        "POST",
        &format!("/api/publish?token={TOKEN}"),
        &[],
        body.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(status, 401);
    assert_nothing_published(&s, &mut ws, "room:auth", offset).await;
}

#[tokio::test]
async fn bad_bodies_get_400_naming_the_problem_and_publish_nothing() {
    let s = start().await;
    let (mut ws, _, offset) = subscriber(&s, "room:p").await;
    let good = item("room:p", "e", json!(1));

    // Not JSON at all, or cut short.
    for body in [&b"not json"[..], b"{\"topic\":", b"", b"[", b"{} {}"] {
        let msg = rejected(&s, body, 400).await;
        assert!(msg.to_lowercase().contains("json"), "{msg}");
    }
    let msg = rejected(&s, &[0xff, 0xfe, b'{', b'}'], 400).await;
    assert!(
        msg.to_lowercase().contains("utf-8") || msg.to_lowercase().contains("json"),
        "{msg}"
    );
    // JSON, but not an object or an array of objects.
    for body in ["null", "42", r#""room:p""#, "true", "[1]", "[[]]"] {
        rejected(&s, body.as_bytes(), 400).await;
    }
    // Nor its fields as an array, which serde's derive would take (found by the fuzz target
    // publish_body).
    for body in [r#"[["room:p","e",1]]"#, r#"[["room:p","e",1,null]]"#] {
        let msg = rejected(&s, body.as_bytes(), 400).await;
        assert!(msg.contains("object"), "{msg}");
    }

    // A missing field is named.
    for (field, body) in [
        ("topic", json!({"event": "e", "payload": 1})),
        ("event", json!({"topic": "room:p", "payload": 1})),
        ("payload", json!({"topic": "room:p", "event": "e"})),
    ] {
        let msg = rejected(&s, body.to_string().as_bytes(), 400).await;
        assert!(msg.contains(field), "{field}: {msg}");
    }
    // So is an unknown one.
    let msg = rejected(
        &s,
        json!({"topic": "room:p", "event": "e", "payload": 1, "extra": 1})
            .to_string()
            .as_bytes(),
        400,
    )
    .await;
    assert!(msg.contains("extra"), "{msg}");
    // Wrong types.
    for body in [
        json!({"topic": 5, "event": "e", "payload": 1}),
        json!({"topic": "room:p", "event": null, "payload": 1}),
    ] {
        rejected(&s, body.to_string().as_bytes(), 400).await;
    }

    // Reserved or out-of-range names.
    let msg = rejected(
        &s,
        item("room:p", "phx_reply", json!(1)).to_string().as_bytes(),
        400,
    )
    .await;
    assert!(msg.contains("phx_"), "{msg}");
    let long_topic = format!("room:{}", "x".repeat(251)); // 256 bytes
    assert_eq!(long_topic.len(), 256);
    let msg = rejected(
        &s,
        item(&long_topic, "e", json!(1)).to_string().as_bytes(),
        400,
    )
    .await;
    assert!(msg.contains("topic"), "{msg}");
    for (topic, event) in [("", "e"), ("phoenix", "e"), ("room:p", "")] {
        rejected(&s, item(topic, event, json!(1)).to_string().as_bytes(), 400).await;
    }
    let long_event = "e".repeat(256);
    rejected(
        &s,
        item("room:p", &long_event, json!(1)).to_string().as_bytes(),
        400,
    )
    .await;

    // Batches: empty; a bad second item names "item 1" and publishes nothing, not even item 0.
    let msg = rejected(&s, b"[]", 400).await;
    assert!(msg.contains("empty"), "{msg}");
    let bad_second = json!([good, {"event": "e", "payload": 1}]);
    let msg = rejected(&s, bad_second.to_string().as_bytes(), 400).await;
    assert!(msg.contains("item 1"), "{msg}");
    assert!(msg.contains("topic"), "{msg}");
    let bad_third = json!([good, good, item("room:p", "phx_join", json!(1))]);
    let msg = rejected(&s, bad_third.to_string().as_bytes(), 400).await;
    assert!(msg.contains("item 2"), "{msg}");
    let msg = rejected(&s, format!("[{good}, {good}, not json]").as_bytes(), 400).await;
    assert!(msg.to_lowercase().contains("json"), "{msg}");

    assert_nothing_published(&s, &mut ws, "room:p", offset).await;
    assert_eq!(
        metric_sum(s.addr, "pushgate_messages_published_total").await,
        Some(1.0),
        "only the probe"
    );
}

#[tokio::test]
async fn names_at_the_limits_are_accepted() {
    let s = start().await;
    let topic = format!("room:{}", "t".repeat(250)); // 255 bytes
    assert_eq!(topic.len(), 255);
    let event = "e".repeat(255);
    let (mut ws, _, _) = subscriber(&s, &topic).await;
    let (status, v) = post(&s, &item(&topic, &event, json!("x"))).await;
    assert_eq!(status, 200, "{v}");
    let m = recv(&mut ws).await;
    assert_eq!(m[2], topic.as_str());
    assert_eq!(m[3], event.as_str());
}

/// A valid publish body of exactly `len` bytes.
fn body_of_len(len: usize) -> Vec<u8> {
    let head = r#"{"topic":"room:big","event":"e","payload":""#;
    let tail = r#""}"#;
    let body = format!("{head}{}{tail}", "x".repeat(len - head.len() - tail.len()));
    assert_eq!(body.len(), len);
    body.into_bytes()
}

#[tokio::test]
async fn an_oversized_body_gets_413() {
    let mut c = test_config();
    c.publish.max_body_bytes = 1024;
    let s = start_with(c).await;
    let (mut ws, _, offset) = subscriber(&s, "room:big").await;

    // With Content-Length.
    let msg = rejected(&s, &body_of_len(2000), 413).await;
    assert!(msg.contains("1024"), "the limit is named: {msg}");
    rejected(&s, &body_of_len(1025), 413).await;

    // Chunked, without Content-Length: the limit applies to what actually arrives.
    let body = body_of_len(2000);
    let mut req = format!(
        "POST /api/publish HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        s.addr,
        bearer()
    )
    .into_bytes();
    for chunk in body.chunks(300) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let (status, head, v) = raw_http(s.addr, &req).await.unwrap();
    error_message(status, 413, &head, &body_json(&v));

    assert_nothing_published(&s, &mut ws, "room:big", offset).await;

    // At the limit is fine, with Content-Length and chunked.
    let (status, _, v) = post_publish(s.addr, Some(&bearer()), &body_of_len(1024)).await;
    assert_eq!(status, 200, "{v}");
    let body = body_of_len(1024);
    let mut req = format!(
        "POST /api/publish HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        s.addr,
        bearer()
    )
    .into_bytes();
    for chunk in body.chunks(100) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let (status, _, v) = raw_http(s.addr, &req).await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&v));
}

#[tokio::test]
async fn other_methods_get_405() {
    let s = start().await;
    for method in ["GET", "PUT", "DELETE"] {
        let auth = bearer();
        let (status, head, body) = try_http(
            s.addr,
            method,
            "/api/publish",
            &[("Authorization", &auth)],
            b"",
        )
        .await
        .unwrap();
        error_message(status, 405, &head, &body_json(&body));
        assert!(
            head.to_ascii_lowercase().contains("allow: post"),
            "{method}: {head}"
        );
    }
}

#[tokio::test]
async fn health_readiness_metrics_and_not_found() {
    let s = start().await;

    let (status, head, body) = http(s.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json")
    );
    assert!(serde_json::from_slice::<Value>(&body).unwrap().is_object());

    let (status, head, body) = http(s.addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json")
    );
    assert!(serde_json::from_slice::<Value>(&body).unwrap().is_object());

    for path in ["/nope", "/api/publishx", "/api", "/socket", "/metrics/x"] {
        let (status, head, body) = http(s.addr, "GET", path, &[], b"").await;
        assert_eq!(status, 404, "{path}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{path}: {head}"
        );
        assert!(body_json(&body)["error"].is_string(), "{path}");
    }

    // Some traffic, so the counters have something to count.
    let (mut ws, _, _) = subscriber(&s, "room:m").await;
    for n in 0..3 {
        publish(s.addr, "room:m", "e", &n.to_string()).await;
    }
    for _ in 0..3 {
        recv(&mut ws).await;
    }

    let (status, head, body) = http(s.addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    let text = String::from_utf8(body).unwrap();
    // Families may grow labels (e.g. by transport); each must have at least one sample.
    for name in [
        "pushgate_messages_published_total",
        "pushgate_connections{transport=\"websocket\"}",
        "pushgate_joins_total",
        "pushgate_messages_delivered_total",
        "pushgate_slow_consumer_closes_total",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{name} "))
                || (!name.contains('{') && l.starts_with(&format!("{name}{{")))),
            "{name} missing:\n{text}"
        );
    }
    // The standard process metrics, with plausible values.
    let sample = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
            .parse()
            .unwrap()
    };
    assert!(sample("process_resident_memory_bytes") > 1e6);
    assert!(sample("process_virtual_memory_bytes") >= sample("process_resident_memory_bytes"));
    let fds = sample("process_open_fds");
    assert!(fds >= 3.0 && fds <= sample("process_max_fds"), "{fds}");
    assert!(sample("process_cpu_seconds_total") >= 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = sample("process_start_time_seconds");
    assert!(started <= now && started > now - 600.0, "{started}");
    // Every sample line is `name[{labels}] number`, and every family has a TYPE.
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
        let family = name.split('{').next().unwrap();
        // A histogram's samples are its `_bucket`, `_sum` and `_count` series.
        let histogram = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| family.strip_suffix(s))
            .any(|base| text.contains(&format!("# TYPE {base} histogram")));
        assert!(
            histogram || text.contains(&format!("# TYPE {family} ")),
            "no TYPE for {family}"
        );
    }
    assert_eq!(
        metric_sum(s.addr, "pushgate_messages_published_total").await,
        Some(3.0)
    );
    assert_eq!(
        metric_sum(s.addr, "pushgate_messages_delivered_total").await,
        Some(3.0)
    );
    assert_eq!(metric_sum(s.addr, "pushgate_joins_total").await, Some(1.0));
    assert_eq!(
        metric(s.addr, "pushgate_connections{transport=\"websocket\"}").await,
        Some(1.0)
    );
    assert_eq!(
        metric_sum(s.addr, "pushgate_slow_consumer_closes_total").await,
        Some(0.0)
    );
}

/// The count of `pushgate_delivery_seconds{from}` once it reaches `want` (the fanout task
/// observes a large topic's sweep after its writes, so it may lag the last frame a little).
async fn delivery_count_reaches(addr: std::net::SocketAddr, from: &str, want: f64) -> f64 {
    let sample = format!("pushgate_delivery_seconds_count{{from=\"{from}\"}}");
    let end = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let n = metric(addr, &sample).await.expect("the delivery histogram");
        if n >= want || tokio::time::Instant::now() > end {
            return n;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// `pushgate_delivery_seconds` (issue 22): one observation per message delivered on this
/// node, whether a small topic's publish writes it inline or a large topic's fanout task
/// sweeps it; a publish to a topic nobody here follows is not an observation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_times_are_observed_per_delivered_message() {
    let s = start_with(many_clients_config()).await;
    let (mut ws, _, _) = subscriber(&s, "room:small").await;
    for n in 0..3 {
        assert_eq!(post(&s, &item("room:small", "e", json!(n))).await.0, 200);
        assert_eq!(recv(&mut ws).await[4], n);
    }
    assert_eq!(post(&s, &item("room:nobody", "e", json!(0))).await.0, 200);
    assert_eq!(delivery_count_reaches(s.addr, "publish", 3.0).await, 3.0);

    // Past the inline limit (64 subscribers): the fanout task's sweeps.
    let mut many = Vec::new();
    for _ in 0..70 {
        many.push(subscriber(&s, "room:large").await.0);
    }
    assert_eq!(post(&s, &item("room:large", "e", json!("x"))).await.0, 200);
    for ws in &mut many {
        assert_eq!(recv(ws).await[4], "x");
    }
    assert_eq!(delivery_count_reaches(s.addr, "publish", 4.0).await, 4.0);
    let under_a_second = metric(
        s.addr,
        r#"pushgate_delivery_seconds_bucket{from="publish",le="1"}"#,
    )
    .await;
    assert_eq!(under_a_second, Some(4.0));
    assert_eq!(
        metric(s.addr, r#"pushgate_delivery_seconds_count{from="redis"}"#).await,
        Some(0.0)
    );
}
