//! The Redis envelope decoder (`broker::redis::Envelope`): what arrives on a topic's channel,
//! from our publish script or from anyone with `PUBLISH`, appended to a live topic of a hub
//! fed by the broker, as `broker::redis::on_message` does.
//!
//! Input: a topic, a NUL byte, the channel message.
//! Properties:
//! - decoding never panics; a message without `event` or `payload`, or whose payload is not
//!   JSON, is refused;
//! - an accepted message is appended to the topic (with a position when it carries a
//!   well-formed `epoch:offset`, which becomes the topic's position) as a valid WebSocket text
//!   frame whose Phoenix message is `[null, position, topic, event, payload]` with the event and
//!   payload as sent, and whose LongPoll form (`json_string`) is a JSON string of that text;
//! - `exclude` leaves out only a connection of this node (`<node>.<id>`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pushgate::broker::redis::Envelope;
use pushgate::hub::{ConnHandle, Hub, RemoteAppend};
use pushgate::protocol::{self, Payload};
use pushgate_fuzz::Cursor;
use pushgate_fuzz::json::Members;
use serde_json::Value;
use std::sync::Arc;

const NODE: &str = "0000beef";

fuzz_target!(|input: &[u8]| {
    let mut c = Cursor::new(input);
    let Ok(topic) = std::str::from_utf8(c.until(0)) else {
        return;
    };
    let message = c.rest();
    let Ok(env) = Envelope::decode(message) else {
        // Refused: check that a reference reading refuses it too.
        let unique = serde_json::from_slice::<Members>(message).is_ok_and(|Members(m)| {
            m.iter()
                .enumerate()
                .all(|(i, (k, _))| m[..i].iter().all(|(k2, _)| k2 != k))
        });
        if let (true, Ok(Value::Object(o))) = (unique, serde_json::from_slice::<Value>(message)) {
            let ok_position = match o.get("position") {
                None | Some(Value::Null) | Some(Value::String(_)) => true,
                _ => false,
            };
            let ok_exclude = matches!(
                o.get("exclude"),
                None | Some(Value::Null) | Some(Value::String(_))
            );
            assert!(
                !(ok_position
                    && ok_exclude
                    && o.get("event").is_some_and(Value::is_string)
                    && o.contains_key("payload")),
                "refused a well-formed message: {o:?}"
            );
        }
        return;
    };
    let broadcast = env.broadcast(NODE);
    let position = env.position();
    let metrics = Arc::new(pushgate::metrics::Metrics::default());
    let hub = Hub::with_broker(Default::default(), metrics, Default::default());
    let (epoch, offset) = position.unwrap_or(("e", 0));
    hub.go_live(topic, epoch, offset.saturating_sub(1));
    let (mut sub, _) = hub.subscribe(topic, Arc::new(ConnHandle::default()), None);
    let appended = hub.append_remote(topic, position, broadcast);
    if position.is_some_and(|(_, o)| o == 0) {
        assert_eq!(appended, RemoteAppend::Duplicate);
        return;
    }
    assert_eq!(appended, RemoteAppend::Appended);
    let mut entries = Vec::new();
    sub.read(u64::MAX, usize::MAX, &mut |e| entries.push(e.clone()))
        .expect("no lag");
    let [entry] = &entries[..] else {
        panic!("{} entries", entries.len());
    };
    let frame = entry.ws_frame();
    let (fin, opcode, text) = pushgate_fuzz::decode_server_frame(frame).expect("a frame");
    assert!(fin && opcode == pushgate::ws::OP_TEXT);
    assert_eq!(text, &entry.text()[..]);
    let m = protocol::parse_text(text)
        .unwrap_or_else(|e| panic!("we would send {:?}: {e}", String::from_utf8_lossy(text)));
    let want_position = position.map(|(e, o)| format!("{e}:{o}"));
    assert_eq!(m.join_ref, None);
    assert_eq!(m.msg_ref, want_position);
    assert_eq!(m.topic, topic);
    assert_eq!(m.event, broadcast.event);
    let Payload::Json(p) = &m.payload else {
        panic!("binary")
    };
    assert_eq!(p.get().as_bytes(), broadcast.payload);
    let s: String = serde_json::from_slice(&entry.json_string()).expect("a JSON string");
    assert_eq!(s.as_bytes(), text);
    // `exclude`
    #[derive(serde::Deserialize)]
    struct Exclude {
        exclude: Option<String>,
    }
    let Ok(raw) = serde_json::from_slice::<Exclude>(message) else {
        // Accepted with an `exclude` a String cannot hold: then it must not exclude anyone.
        assert_eq!(entry.exclude, 0);
        return;
    };
    let ours = raw
        .exclude
        .as_deref()
        .and_then(|e| e.strip_prefix(&format!("{NODE}.")))
        .and_then(|id| id.parse::<u64>().ok())
        .unwrap_or(0);
    assert_eq!(entry.exclude, ours);
});
