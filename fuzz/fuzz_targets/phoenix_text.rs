//! The Phoenix V2 text decoder (`protocol::parse_text`) and the text encoders.
//!
//! Properties:
//! - every well-formed message (a JSON array of at least 5 elements whose refs are strings of at
//!   most 255 bytes or null, whose topic and event are strings) is accepted, with those fields;
//! - a decoded message, encoded again (`push_text_frame`), decodes to an equal message;
//! - a refused one yields an error reply (what the session sends) that decodes, echoes the
//!   refs and topic it could recover (never a ref over 255 bytes), and carries the reason;
//! - the other text encoders (reply, close, push, channel error) decode to what they were given,
//!   and `json_string` is a JSON string holding the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pushgate::protocol::{self, Inbound, MAX_FIELD_BYTES, Payload};
use serde_json::Value;

fn json(p: &Payload) -> &str {
    match p {
        Payload::Json(raw) => raw.get(),
        Payload::Binary(_) => panic!("a text frame gave a binary payload"),
    }
}

fn decode(frame: &[u8]) -> Inbound {
    protocol::parse_text(frame).unwrap_or_else(|e| {
        panic!(
            "our own frame {:?} does not decode: {e}",
            String::from_utf8_lossy(frame)
        )
    })
}

/// A reply payload: the response kept as text (it may hold numbers no f64 holds).
#[derive(serde::Deserialize)]
struct Reply {
    status: String,
    response: Box<serde_json::value::RawValue>,
}

fn reply_of(frame: &[u8]) -> (Inbound, Reply) {
    let m = decode(frame);
    assert_eq!(m.event, "phx_reply");
    let v: Reply = serde_json::from_str(json(&m.payload)).expect("a JSON reply payload");
    (m, v)
}

fuzz_target!(|input: &[u8]| {
    // The reference reading, from serde_json's own value model.
    let expected = serde_json::from_slice::<Value>(input).ok().and_then(|v| {
        let items = v.as_array()?.clone();
        if items.len() < 5 {
            return None;
        }
        let opt_ref = |v: &Value| match v {
            Value::Null => Some(None),
            Value::String(s) if s.len() <= MAX_FIELD_BYTES => Some(Some(s.clone())),
            _ => None,
        };
        Some((
            opt_ref(&items[0])?,
            opt_ref(&items[1])?,
            items[2].as_str()?.to_owned(),
            items[3].as_str()?.to_owned(),
            items[4].clone(),
        ))
    });
    match protocol::parse_text(input) {
        Ok(m) => {
            if let Some((join_ref, msg_ref, topic, event, payload)) = expected {
                assert_eq!((&m.join_ref, &m.msg_ref), (&join_ref, &msg_ref));
                assert_eq!((&m.topic, &m.event), (&topic, &event));
                assert_eq!(
                    serde_json::from_str::<Value>(json(&m.payload)).ok(),
                    Some(payload)
                );
            }
            for r in [&m.join_ref, &m.msg_ref].into_iter().flatten() {
                assert!(r.len() <= MAX_FIELD_BYTES);
            }
            let mut again = Vec::new();
            protocol::push_text_frame(
                &mut again,
                m.join_ref.as_deref(),
                m.msg_ref.as_deref(),
                &m.topic,
                &m.event,
                json(&m.payload).as_bytes(),
            );
            assert_eq!(decode(&again), m, "re-encoded message decodes differently");

            let (r, v) = reply_of(&protocol::encode_reply(
                m.join_ref.as_deref(),
                m.msg_ref.as_deref(),
                &m.topic,
                "ok",
                json(&m.payload).as_bytes(),
            ));
            assert_eq!(
                (&r.join_ref, &r.msg_ref, &r.topic),
                (&m.join_ref, &m.msg_ref, &m.topic)
            );
            assert_eq!(v.status, "ok");
            assert_eq!(v.response.get(), json(&m.payload));
            let jr = m.join_ref.as_deref().unwrap_or("");
            let close = decode(&protocol::encode_close(jr, &m.topic));
            assert_eq!(
                (close.event.as_str(), &close.topic),
                ("phx_close", &m.topic)
            );
            assert_eq!(close.msg_ref.as_deref(), Some(jr));
            let push = decode(&protocol::encode_push(
                jr,
                &m.topic,
                &m.event,
                json(&m.payload).as_bytes(),
            ));
            assert_eq!((&push.event, &push.msg_ref), (&m.event, &None));
            assert_eq!(json(&push.payload), json(&m.payload));
            let err = decode(&protocol::encode_channel_error(jr, &m.topic, &m.event));
            let v: Value = serde_json::from_str(json(&err.payload)).unwrap();
            assert_eq!(v["reason"].as_str(), Some(m.event.as_str()));
        }
        Err(e) => {
            assert!(
                expected.is_none(),
                "a well-formed message was refused: {e} ({:?})",
                String::from_utf8_lossy(input)
            );
            for r in [&e.join_ref, &e.msg_ref].into_iter().flatten() {
                assert!(
                    r.len() <= MAX_FIELD_BYTES,
                    "an over-long ref would be echoed"
                );
            }
            let topic = e.topic.as_deref().unwrap_or(protocol::PHOENIX_TOPIC);
            let (r, v) = reply_of(&protocol::encode_error_reply(
                e.join_ref.as_deref(),
                e.msg_ref.as_deref(),
                topic,
                &e.reason,
            ));
            assert_eq!((&r.join_ref, &r.msg_ref), (&e.join_ref, &e.msg_ref));
            assert_eq!(r.topic, topic);
            assert_eq!(v.status, "error");
            let response: Value = serde_json::from_str(v.response.get()).unwrap();
            assert_eq!(response["reason"].as_str(), Some(e.reason.as_str()));
        }
    }
    if let Ok(text) = std::str::from_utf8(input) {
        let s = protocol::json_string(input);
        assert_eq!(
            serde_json::from_slice::<String>(&s).ok().as_deref(),
            Some(text)
        );
    }
});
