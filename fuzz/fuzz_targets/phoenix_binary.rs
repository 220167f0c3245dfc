//! The Phoenix V2 binary decoder (`protocol::parse_binary`) and the binary encoders.
//!
//! Properties:
//! - a push (kind 0) whose four field lengths fit in the frame and whose fields are UTF-8 is
//!   accepted, and anything else is refused;
//! - what it accepts re-encodes, by PHOENIX-PROTOCOL.md §1.3, to exactly the bytes it came as;
//! - the server's binary push, reply and broadcast decode, by §1.3, to what they were given, and
//!   are refused (None) exactly when a field is over 255 bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pushgate::protocol::{self, Payload};
use pushgate_fuzz::{decode_binary, encode_binary};

fuzz_target!(|frame: &[u8]| {
    let well_formed = decode_binary(frame, 0, 4)
        .is_some_and(|(fields, _)| fields.iter().all(|f| std::str::from_utf8(f).is_ok()));
    match protocol::parse_binary(frame) {
        Ok(m) => {
            assert!(well_formed, "accepted a malformed push");
            let Payload::Binary(payload) = &m.payload else {
                panic!("a binary frame gave a JSON payload");
            };
            let again = encode_binary(
                0,
                &[
                    m.join_ref.as_deref().unwrap_or("").as_bytes(),
                    m.msg_ref.as_deref().unwrap_or("").as_bytes(),
                    m.topic.as_bytes(),
                    m.event.as_bytes(),
                ],
                payload,
            );
            assert_eq!(
                again, frame,
                "an accepted push does not re-encode to its bytes"
            );
            assert!(m.join_ref.as_ref().is_none_or(|r| !r.is_empty()));
            assert!(m.msg_ref.as_ref().is_none_or(|r| !r.is_empty()));

            let jr = m.join_ref.as_deref().unwrap_or("");
            let mr = m.msg_ref.as_deref().unwrap_or("");
            let reply = protocol::encode_binary_reply(jr, mr, &m.topic, &m.event, payload)
                .expect("fields of at most 255 bytes");
            let (f, p) = decode_binary(&reply, 1, 4).expect("a §1.3 reply");
            assert_eq!(
                f,
                [
                    jr.as_bytes(),
                    mr.as_bytes(),
                    m.topic.as_bytes(),
                    m.event.as_bytes()
                ]
            );
            assert_eq!(p, &payload[..]);
            let push = protocol::encode_binary_push(jr, &m.topic, &m.event, payload).unwrap();
            let (f, p) = decode_binary(&push, 0, 3).expect("a §1.3 push");
            assert_eq!(f, [jr.as_bytes(), m.topic.as_bytes(), m.event.as_bytes()]);
            assert_eq!(p, &payload[..]);
            let b = protocol::encode_binary_broadcast(&m.topic, &m.event, payload).unwrap();
            let (f, p) = decode_binary(&b, 2, 2).expect("a §1.3 broadcast");
            assert_eq!(f, [m.topic.as_bytes(), m.event.as_bytes()]);
            assert_eq!(p, &payload[..]);
            // One field too long for its length byte: refused, never truncated.
            let long = format!("{}{}", m.topic, "x".repeat(256 - m.topic.len().min(256)));
            assert!(protocol::encode_binary_broadcast(&long, &m.event, payload).is_none());
        }
        Err(e) => {
            assert!(!well_formed, "refused a well-formed push: {e}");
        }
    }
});
