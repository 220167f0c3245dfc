//! The publish API body (`api::publish_body`) on a real `App` with the embedded broker.
//!
//! Properties:
//! - a body is published (200) exactly when a reference reading accepts it: UTF-8, one object
//!   or a non-empty array of objects, each with exactly the members topic (1-255 bytes, not
//!   "phoenix"), event (1-255 bytes, not "phx_..."), payload (any JSON) and optionally exclude
//!   (a sender id or null), no member twice; otherwise 400 with a JSON `{"error": ...}`;
//! - a batch publishes nothing unless every item is valid;
//! - the answer gives one position per item, and each item sits in its topic's history at that
//!   position as the frame `[null, position, topic, event, payload]` (a valid WebSocket text
//!   frame and Phoenix message), excluding the connection it names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pushgate::hub::ConnHandle;
use pushgate::protocol::{self, Payload};
use pushgate_fuzz::json::Members;
use serde_json::Value;
use serde_json::value::RawValue;
use std::sync::Arc;
use std::sync::atomic::Ordering;

struct Item {
    topic: String,
    event: String,
    payload: String,
    exclude: Option<String>,
}

fn item(raw: &str) -> Option<Item> {
    let Members(members) = serde_json::from_str(raw).ok()?;
    let mut seen = Vec::new();
    let (mut topic, mut event, mut payload, mut exclude) = (None, None, None, None);
    for (k, v) in &members {
        if seen.contains(&k.as_str()) {
            return None;
        }
        seen.push(k);
        let string = || serde_json::from_str::<String>(v.get()).ok();
        match k.as_str() {
            "topic" => topic = Some(string()?),
            "event" => event = Some(string()?),
            "payload" => payload = Some(v.get().to_string()),
            "exclude" if v.get() == "null" => {}
            "exclude" => exclude = Some(string()?),
            _ => return None,
        }
    }
    let (topic, event, payload) = (topic?, event?, payload?);
    let ok = (1..=255).contains(&topic.len())
        && topic != "phoenix"
        && (1..=255).contains(&event.len())
        && !event.starts_with("phx_")
        && exclude
            .as_deref()
            .is_none_or(pushgate::session::is_sender_id);
    ok.then_some(Item {
        topic,
        event,
        payload,
        exclude,
    })
}

/// `(is_batch, items)` when the body should be published.
fn reference(body: &[u8]) -> Option<(bool, Vec<Item>)> {
    let text = std::str::from_utf8(body).ok()?;
    if text.trim_start().starts_with('[') {
        let raws: Vec<&RawValue> = serde_json::from_str(text).ok()?;
        if raws.is_empty() {
            return None;
        }
        Some((
            true,
            raws.iter().map(|r| item(r.get())).collect::<Option<_>>()?,
        ))
    } else {
        Some((false, vec![item(text)?]))
    }
}

fuzz_target!(|body: &[u8]| {
    let mut config = pushgate::Config::default();
    config.history.size = 1 << 16;
    let app = pushgate::App::new(config, tokio_util::sync::CancellationToken::new());
    let answer = pushgate_fuzz::block_on(pushgate::api::publish_body(&app, body));
    let json: Value = serde_json::from_slice(&answer.body).expect("a JSON answer");
    let Some((batch, items)) = reference(body) else {
        assert_eq!(
            answer.status, 400,
            "published what should be refused: {json}"
        );
        assert!(json["error"].is_string());
        let published = app.metrics.messages_published.load(Ordering::Relaxed);
        assert_eq!(published, 0, "a refused body published something");
        return;
    };
    assert_eq!(answer.status, 200, "refused a valid body: {json}");
    let positions: Vec<String> = if batch {
        json["positions"]
            .as_array()
            .expect("positions")
            .iter()
            .map(|p| p.as_str().expect("a position").to_string())
            .collect()
    } else {
        vec![json["position"].as_str().expect("a position").to_string()]
    };
    assert_eq!(positions.len(), items.len());
    for (item, position) in items.iter().zip(&positions) {
        let (epoch, offset) = pushgate::hub::parse_position(position).expect("a position");
        let since = format!("{epoch}:{}", offset - 1);
        let (mut sub, _) =
            app.hub
                .subscribe(&item.topic, Arc::new(ConnHandle::default()), Some(&since));
        let mut first = None;
        sub.read(u64::MAX, usize::MAX, &mut |e| {
            if first.is_none() {
                first = Some((e.ws_frame().clone(), e.text(), e.exclude));
            }
        })
        .expect("the history holds the message");
        let (frame, text, exclude) = first.expect("the message is in its topic's history");
        let (fin, opcode, inner) = pushgate_fuzz::decode_server_frame(&frame).expect("a frame");
        assert!(fin && opcode == pushgate::ws::OP_TEXT && inner == &text[..]);
        let m = protocol::parse_text(&text).expect("a Phoenix message");
        assert_eq!(m.join_ref, None);
        assert_eq!(m.msg_ref.as_deref(), Some(position.as_str()));
        assert_eq!((&m.topic, &m.event), (&item.topic, &item.event));
        let Payload::Json(p) = &m.payload else {
            panic!("binary payload")
        };
        assert_eq!(p.get(), item.payload);
        assert_eq!(
            exclude,
            pushgate::session::local_exclude(item.exclude.as_deref(), &app.node_id)
        );
    }
});
