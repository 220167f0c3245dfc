//! Bounds on topics (issue 16): `limits.max_topics` caps the topics a node holds, and a topic that
//! only ever carried presence diffs does not outlive its last subscriber by minutes.

mod support;

use serde_json::Value;
use std::time::Duration;
use support::*;
use tokio::time::Instant;

/// Waits until the `/metrics` sample equals `want`, for at most `within`.
async fn wait_metric_within(s: &TestServer, sample: &str, want: f64, within: Duration) {
    let end = Instant::now() + within;
    loop {
        let v = metric(s.addr, sample).await;
        if v == Some(want) {
            return;
        }
        assert!(Instant::now() < end, "{sample} is {v:?}, want {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Frames until the `phx_close` of `topic` (other frames, such as presence, are skipped).
async fn until_close(ws: &mut Ws, topic: &str) {
    loop {
        let m = recv(ws).await;
        if m[2] == topic && m[3] == "phx_close" {
            return;
        }
    }
}

#[tokio::test]
async fn a_join_that_would_create_a_topic_past_max_topics_is_refused_and_the_connection_lives_on() {
    let mut c = test_config();
    c.limits.max_topics = 5;
    let s = start_with(c).await;
    let mut a = connect(s.addr).await;
    let mut b = connect(s.addr).await;
    for i in 1..=5 {
        join(&mut a, &i.to_string(), &format!("room:{i}"), "{}").await;
    }
    send(&mut a, r#"["6","6","room:6","phx_join",{}]"#).await;
    let r = recv(&mut a).await;
    assert_eq!(
        (&r[0], &r[1], &r[2], &r[3]),
        (
            &"6".into(),
            &"6".into(),
            &"room:6".into(),
            &"phx_reply".into()
        ),
        "{r}"
    );
    assert_eq!(r[4]["status"], "error", "{r}");
    let reason = r[4]["response"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("limits.max_topics"), "{r}");
    assert_eq!(s.app.hub.subscriber_count("room:6"), 0);
    assert_eq!(metric(s.addr, "pushgate_topics").await, Some(5.0));
    assert_eq!(
        metric(s.addr, r#"pushgate_refusals_total{cause="topic_cap"}"#).await,
        Some(1.0)
    );

    // Existing topics may still be joined, by anyone, and keep delivering.
    join(&mut b, "1", "room:1", "{}").await;
    let pos = publish(s.addr, "room:1", "still_here", "{}").await;
    for ws in [&mut a, &mut b] {
        let m = recv(ws).await;
        assert_eq!(
            (&m[1], &m[3]),
            (&Value::from(pos.as_str()), &"still_here".into()),
            "{m}"
        );
    }
    send(&mut a, r#"[null,"9","phoenix","heartbeat",{}]"#).await;
    assert_eq!(recv(&mut a).await[4]["status"], "ok");
}

/// 500 joins and leaves on distinct presence topics (each leaves a `presence_diff` in its
/// topic's history) leave no topics behind soon after; a topic that carried an app message
/// keeps its history.
#[tokio::test]
async fn a_presence_topic_flood_leaves_no_topics_behind() {
    let mut c = test_config();
    c.presence.topics = vec!["room:*".into()];
    let s = start_with(c).await;
    assert_eq!(s.app.config.history.max_age_secs, 300);
    let mut ws = connect(s.addr).await;
    let pos = publish(s.addr, "room:keep", "news", "{}").await;
    for i in 0..500 {
        let topic = format!("room:{i}");
        let r = i.to_string();
        send(
            &mut ws,
            &format!(r#"["{r}","{r}","{topic}","phx_join",{{"presence":{{"n":{i}}}}}]"#),
        )
        .await;
        send(
            &mut ws,
            &format!(r#"["{r}","x{r}","{topic}","phx_leave",{{}}]"#),
        )
        .await;
        until_close(&mut ws, &topic).await;
    }
    // Only the topic with an app message remains, well before history.max_age_secs.
    wait_metric_within(&s, "pushgate_topics", 1.0, Duration::from_secs(25)).await;
    // (A fresh connection: the first may still carry presence frames of the flood.)
    let mut ws = connect(s.addr).await;
    let reply = join(
        &mut ws,
        "k",
        "room:keep",
        &format!(r#"{{"since":"{}"}}"#, pos_before(&pos)),
    )
    .await;
    assert_eq!(reply["recovered"], true, "{reply}");
}

/// The position just before `pos` (`epoch:offset`).
fn pos_before(pos: &str) -> String {
    let (epoch, offset) = split_position(pos);
    format!("{epoch}:{}", offset - 1)
}
