//! Phoenix Channels V2 frames: parsing what clients send and encoding what we send back.
//!
//! This module owns the wire format of `../shared/PHOENIX-PROTOCOL.md` §1.2 (JSON text frames)
//! and §1.3 (binary frames). It does no I/O and knows nothing about sessions or topics: bytes in,
//! [`Inbound`] out; values in, encoded bytes out.
//!
//! Architecture Invariant: refs and join_refs are opaque strings. They are echoed exactly as
//! received and always encoded as JSON strings, never as numbers.

use bytes::Bytes;
use serde_json::value::RawValue;

/// The topic the client uses for heartbeats.
pub const PHOENIX_TOPIC: &str = "phoenix";
/// The event of a presence diff (phoenix.js's `Presence` listens for it). The hub does not keep
/// a topic whose history holds only these once its last subscriber is gone
/// ([`crate::hub::Hub::sweep`]).
pub const PRESENCE_DIFF_EVENT: &str = "presence_diff";
/// Binary frame field lengths are one byte, so topics, events and refs are capped at this.
pub const MAX_FIELD_BYTES: usize = 255;

/// A message received from a client.
#[derive(Debug, PartialEq, Eq)]
pub struct Inbound {
    pub join_ref: Option<String>,
    pub msg_ref: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: Payload,
}

/// The payload of a client message: JSON text from a text frame, raw bytes from a binary frame.
#[derive(Debug)]
pub enum Payload {
    Json(Box<RawValue>),
    Binary(Bytes),
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Payload::Json(a), Payload::Json(b)) => a.get() == b.get(),
            (Payload::Binary(a), Payload::Binary(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Payload {}

/// Why a client frame could not be understood. The recoverable `msg_ref`/`topic`/`join_ref`
/// let the session answer with an error reply the client can match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub reason: String,
    pub join_ref: Option<String>,
    pub msg_ref: Option<String>,
    pub topic: Option<String>,
}

impl ParseError {
    fn bare(reason: impl Into<String>) -> Self {
        ParseError {
            reason: reason.into(),
            join_ref: None,
            msg_ref: None,
            topic: None,
        }
    }
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Parses a text frame: `[join_ref, ref, topic, event, payload]` (extra trailing elements are
/// tolerated, as Phoenix does).
pub fn parse_text(text: &[u8]) -> Result<Inbound, ParseError> {
    let items: Vec<&RawValue> = match serde_json::from_slice(text) {
        Ok(items) => items,
        Err(e) => {
            return Err(ParseError::bare(format!(
                "malformed message: expected a JSON array [join_ref, ref, topic, event, payload] ({e})"
            )));
        }
    };
    // Recover what we can first, so that even a bad message gets a reply the client can match.
    let as_str = |i: usize| -> Option<String> {
        items
            .get(i)
            .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
    };
    // A ref too long to keep is not echoed either.
    let fits = |s: &String| s.len() <= MAX_FIELD_BYTES;
    let mut err = ParseError {
        reason: String::new(),
        join_ref: as_str(0).filter(fits),
        msg_ref: as_str(1).filter(fits),
        topic: as_str(2),
    };
    if items.len() < 5 {
        err.reason = format!(
            "malformed message: expected 5 elements [join_ref, ref, topic, event, payload], got {}",
            items.len()
        );
        return Err(err);
    }
    let opt_string = |i: usize, name: &str| -> Result<Option<String>, String> {
        let raw = items[i].get();
        if raw == "null" {
            return Ok(None);
        }
        serde_json::from_str::<String>(raw)
            .map(Some)
            .map_err(|_| format!("malformed message: {name} must be a string or null"))
    };
    let join_ref = match opt_string(0, "join_ref") {
        Ok(v) => v,
        Err(reason) => {
            err.reason = reason;
            return Err(err);
        }
    };
    let msg_ref = match opt_string(1, "ref") {
        Ok(v) => v,
        Err(reason) => {
            err.reason = reason;
            return Err(err);
        }
    };
    // Sessions keep join_refs (and pending joins their refs), so refs are bounded like topics.
    if [&join_ref, &msg_ref]
        .iter()
        .any(|r| r.as_ref().is_some_and(|r| !fits(r)))
    {
        err.reason =
            format!("malformed message: ref and join_ref must be at most {MAX_FIELD_BYTES} bytes");
        return Err(err);
    }
    let (Some(topic), Some(event)) = (as_str(2), as_str(3)) else {
        err.reason = "malformed message: topic and event must be strings".into();
        return Err(err);
    };
    let payload = items[4].to_owned();
    Ok(Inbound {
        join_ref,
        msg_ref,
        topic,
        event,
        payload: Payload::Json(payload),
    })
}

/// Parses a binary client push (§1.3 kind 0): `0, joinRefLen, refLen, topicLen, eventLen,
/// join_ref, ref, topic, event, payload`.
pub fn parse_binary(frame: &[u8]) -> Result<Inbound, ParseError> {
    const HEADER: usize = 5;
    if frame.len() < HEADER {
        return Err(ParseError::bare("malformed binary message: too short"));
    }
    if frame[0] != 0 {
        return Err(ParseError::bare(format!(
            "malformed binary message: unknown kind {} (clients may only send pushes, kind 0)",
            frame[0]
        )));
    }
    let lens = [
        frame[1] as usize,
        frame[2] as usize,
        frame[3] as usize,
        frame[4] as usize,
    ];
    let total: usize = HEADER + lens.iter().sum::<usize>();
    if frame.len() < total {
        return Err(ParseError::bare(
            "malformed binary message: field lengths exceed the frame",
        ));
    }
    let mut at = HEADER;
    let mut fields: [&[u8]; 4] = [&[]; 4];
    for (i, len) in lens.iter().enumerate() {
        fields[i] = &frame[at..at + len];
        at += len;
    }
    let text = |b: &[u8], name: &str| -> Result<String, ParseError> {
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| ParseError::bare(format!("malformed binary message: {name} is not UTF-8")))
    };
    let join_ref = text(fields[0], "join_ref")?;
    let msg_ref = text(fields[1], "ref")?;
    let topic = text(fields[2], "topic")?;
    let event = text(fields[3], "event")?;
    let non_empty = |s: String| if s.is_empty() { None } else { Some(s) };
    Ok(Inbound {
        join_ref: non_empty(join_ref),
        msg_ref: non_empty(msg_ref),
        topic,
        event,
        payload: Payload::Binary(Bytes::copy_from_slice(&frame[at..])),
    })
}

/// Appends `s` as a JSON string.
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// `text` (JSON we encoded, so UTF-8) as a JSON string literal.
pub fn json_string(text: &[u8]) -> Bytes {
    let mut s = Vec::with_capacity(text.len() + text.len() / 4 + 2);
    push_json_str(&mut s, &String::from_utf8_lossy(text));
    Bytes::from(s)
}

fn push_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => push_json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// Appends a whole text frame `[join_ref, ref, topic, event, payload]`; `payload` is JSON text.
pub fn push_text_frame(
    out: &mut Vec<u8>,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload: &[u8],
) {
    out.push(b'[');
    push_opt_str(out, join_ref);
    out.push(b',');
    push_opt_str(out, msg_ref);
    out.push(b',');
    push_json_str(out, topic);
    out.push(b',');
    push_json_str(out, event);
    out.push(b',');
    out.extend_from_slice(payload);
    out.push(b']');
}

/// A reply: `[join_ref, ref, topic, "phx_reply", {"status": status, "response": response}]`.
pub fn encode_reply(
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    status: &str,
    response: &[u8],
) -> Vec<u8> {
    let mut payload = Vec::with_capacity(32 + status.len() + response.len());
    payload.extend_from_slice(b"{\"status\":");
    push_json_str(&mut payload, status);
    payload.extend_from_slice(b",\"response\":");
    payload.extend_from_slice(response);
    payload.push(b'}');
    let mut out = Vec::with_capacity(48 + topic.len() + payload.len());
    push_text_frame(&mut out, join_ref, msg_ref, topic, "phx_reply", &payload);
    out
}

/// An error response naming its cause: `{"reason": reason, "detail": detail}`.
pub fn reason_and_detail(reason: &str, detail: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + reason.len() + detail.len());
    out.extend_from_slice(b"{\"reason\":");
    push_json_str(&mut out, reason);
    out.extend_from_slice(b",\"detail\":");
    push_json_str(&mut out, detail);
    out.push(b'}');
    out
}

/// An error reply whose response is `{"reason": reason}`.
pub fn encode_error_reply(
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    reason: &str,
) -> Vec<u8> {
    let mut response = Vec::with_capacity(16 + reason.len());
    response.extend_from_slice(b"{\"reason\":");
    push_json_str(&mut response, reason);
    response.push(b'}');
    encode_reply(join_ref, msg_ref, topic, "error", &response)
}

/// `phx_close` for a channel: both ref and join_ref carry the join_ref (§0).
pub fn encode_close(join_ref: &str, topic: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + topic.len());
    push_text_frame(
        &mut out,
        Some(join_ref),
        Some(join_ref),
        topic,
        "phx_close",
        b"{}",
    );
    out
}

/// A push to one channel: `[join_ref, null, topic, event, payload]` (e.g. `presence_state`).
pub fn encode_push(join_ref: &str, topic: &str, event: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + topic.len() + payload.len());
    push_text_frame(&mut out, Some(join_ref), None, topic, event, payload);
    out
}

/// `phx_error` for a channel, e.g. when the server drops it; the client rejoins.
pub fn encode_channel_error(join_ref: &str, topic: &str, reason: &str) -> Vec<u8> {
    let mut payload = Vec::with_capacity(16 + reason.len());
    payload.extend_from_slice(b"{\"reason\":");
    push_json_str(&mut payload, reason);
    payload.push(b'}');
    let mut out = Vec::with_capacity(48 + topic.len() + payload.len());
    push_text_frame(
        &mut out,
        Some(join_ref),
        Some(join_ref),
        topic,
        "phx_error",
        &payload,
    );
    out
}

/// A broadcast: `[null, "<position>", topic, event, payload]`; the position rides in the ref slot.
pub fn push_broadcast(out: &mut Vec<u8>, position: &str, topic: &str, event: &str, payload: &[u8]) {
    push_text_frame(out, None, Some(position), topic, event, payload);
}

/// Binary server push (§1.3 kind 0, no ref): `0, joinRefLen, topicLen, eventLen, ...`.
/// Returns `None` when a field exceeds [`MAX_FIELD_BYTES`].
pub fn encode_binary_push(
    join_ref: &str,
    topic: &str,
    event: &str,
    payload: &[u8],
) -> Option<Vec<u8>> {
    binary_frame(0, &[join_ref, topic, event], payload)
}

/// Binary reply (§1.3 kind 1): `1, joinRefLen, refLen, topicLen, statusLen, ...`.
pub fn encode_binary_reply(
    join_ref: &str,
    msg_ref: &str,
    topic: &str,
    status: &str,
    payload: &[u8],
) -> Option<Vec<u8>> {
    binary_frame(1, &[join_ref, msg_ref, topic, status], payload)
}

/// Binary broadcast (§1.3 kind 2): `2, topicLen, eventLen, topic, event, payload`.
pub fn encode_binary_broadcast(topic: &str, event: &str, payload: &[u8]) -> Option<Vec<u8>> {
    binary_frame(2, &[topic, event], payload)
}

fn binary_frame(kind: u8, fields: &[&str], payload: &[u8]) -> Option<Vec<u8>> {
    if fields.iter().any(|f| f.len() > MAX_FIELD_BYTES) {
        return None;
    }
    let len = 1 + fields.len() + fields.iter().map(|f| f.len()).sum::<usize>() + payload.len();
    let mut out = Vec::with_capacity(len);
    out.push(kind);
    out.extend(fields.iter().map(|f| f.len() as u8));
    for f in fields {
        out.extend_from_slice(f.as_bytes());
    }
    out.extend_from_slice(payload);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(p: &Payload) -> &str {
        match p {
            Payload::Json(raw) => raw.get(),
            Payload::Binary(_) => panic!("binary"),
        }
    }

    #[test]
    fn parses_a_join() {
        let m = parse_text(br#"["6","6","room:lobby","phx_join",{"since":"a:1"}]"#).unwrap();
        assert_eq!(m.join_ref.as_deref(), Some("6"));
        assert_eq!(m.msg_ref.as_deref(), Some("6"));
        assert_eq!(m.topic, "room:lobby");
        assert_eq!(m.event, "phx_join");
        assert_eq!(json(&m.payload), r#"{"since":"a:1"}"#);
    }

    #[test]
    fn parses_a_heartbeat_with_null_join_ref_and_extra_elements() {
        let m = parse_text(br#"[null,"9","phoenix","heartbeat",{},"extra"]"#).unwrap();
        assert_eq!(m.join_ref, None);
        assert_eq!(m.msg_ref.as_deref(), Some("9"));
    }

    #[test]
    fn rejects_bad_input_with_what_can_be_recovered() {
        let e = parse_text(b"not json").unwrap_err();
        assert!(e.reason.starts_with("malformed message"));
        assert_eq!(e.msg_ref, None);

        let e = parse_text(br#"["1","2","room:a"]"#).unwrap_err();
        assert!(e.reason.contains("got 3"), "{}", e.reason);
        assert_eq!(e.msg_ref.as_deref(), Some("2"));
        assert_eq!(e.topic.as_deref(), Some("room:a"));

        let e = parse_text(br#"["1",2,"room:a","ev",{}]"#).unwrap_err();
        assert!(e.reason.contains("ref must be a string"), "{}", e.reason);

        let e = parse_text(br#"["1","2",3,"ev",{}]"#).unwrap_err();
        assert!(e.reason.contains("topic and event"), "{}", e.reason);

        assert!(parse_text(br#"{"topic":"x"}"#).is_err());
    }

    #[test]
    fn refs_longer_than_a_field_are_rejected_and_not_echoed() {
        let max = "1".repeat(MAX_FIELD_BYTES);
        let over = "2".repeat(MAX_FIELD_BYTES + 1);
        let ok = format!(r#"["{max}","{max}","room:a","phx_join",{{}}]"#);
        assert_eq!(
            parse_text(ok.as_bytes()).unwrap().msg_ref,
            Some(max.clone())
        );
        let e = parse_text(format!(r#"["{over}","3","room:a","phx_join",{{}}]"#).as_bytes())
            .unwrap_err();
        assert!(e.reason.contains("255 bytes"), "{}", e.reason);
        assert_eq!((e.join_ref, e.msg_ref), (None, Some("3".into())));
        let e = parse_text(format!(r#"["4","{over}","room:a","ev",{{}}]"#).as_bytes()).unwrap_err();
        assert_eq!((e.join_ref, e.msg_ref), (Some("4".into()), None));
        assert_eq!(e.topic.as_deref(), Some("room:a"));
    }

    #[test]
    fn parses_the_captured_binary_push() {
        // 00 01 01 0a 03 "6" "9" "room:lobby" "bin" ca fe (PHOENIX-PROTOCOL.md §1.3)
        let mut f = vec![0u8, 1, 1, 10, 3];
        f.extend_from_slice(b"69room:lobbybin");
        f.extend_from_slice(&[0xca, 0xfe]);
        let m = parse_binary(&f).unwrap();
        assert_eq!(m.join_ref.as_deref(), Some("6"));
        assert_eq!(m.msg_ref.as_deref(), Some("9"));
        assert_eq!(m.topic, "room:lobby");
        assert_eq!(m.event, "bin");
        assert_eq!(
            m.payload,
            Payload::Binary(Bytes::from_static(&[0xca, 0xfe]))
        );
    }

    #[test]
    fn rejects_bad_binary() {
        assert!(parse_binary(&[0, 1]).is_err());
        assert!(parse_binary(&[2, 1, 1, 1, 1, b'a']).is_err());
        assert!(parse_binary(&[0, 9, 9, 9, 9, b'a']).is_err());
    }

    #[test]
    fn encodes_the_captured_binary_frames() {
        let reply = encode_binary_reply("6", "9", "room:lobby", "ok", &[0xde, 0xad]).unwrap();
        let mut want = vec![1u8, 1, 1, 10, 2];
        want.extend_from_slice(b"69room:lobbyok");
        want.extend_from_slice(&[0xde, 0xad]);
        assert_eq!(reply, want);

        let bcast = encode_binary_broadcast("room:lobby", "bb", &[1, 2, 3]).unwrap();
        let mut want = vec![2u8, 10, 2];
        want.extend_from_slice(b"room:lobbybb");
        want.extend_from_slice(&[1, 2, 3]);
        assert_eq!(bcast, want);

        let push = encode_binary_push("6", "room:lobby", "bp", &[4, 5]).unwrap();
        let mut want = vec![0u8, 1, 10, 2];
        want.extend_from_slice(b"6room:lobbybp");
        want.extend_from_slice(&[4, 5]);
        assert_eq!(push, want);

        assert!(encode_binary_broadcast(&"x".repeat(256), "e", b"").is_none());
    }

    #[test]
    fn reason_and_detail_is_escaped_json() {
        let r = reason_and_detail("forward failed", "the app said \"no\"\n");
        let v: serde_json::Value = serde_json::from_slice(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"reason": "forward failed", "detail": "the app said \"no\"\n"})
        );
    }

    #[test]
    fn encodes_text_frames_with_string_refs() {
        assert_eq!(
            encode_reply(None, Some("9"), "phoenix", "ok", b"{}"),
            br#"[null,"9","phoenix","phx_reply",{"status":"ok","response":{}}]"#
        );
        assert_eq!(
            encode_close("6", "room:lobby"),
            br#"["6","6","room:lobby","phx_close",{}]"#
        );
        assert_eq!(
            encode_error_reply(None, Some("7"), "room:\"x\"", "unmatched topic"),
            br#"[null,"7","room:\"x\"","phx_reply",{"status":"error","response":{"reason":"unmatched topic"}}]"#
        );
        let mut b = Vec::new();
        push_broadcast(&mut b, "ab:3", "room:lobby", "new_msg", br#"{"n":1}"#);
        assert_eq!(b, br#"[null,"ab:3","room:lobby","new_msg",{"n":1}]"#);
        assert_eq!(
            encode_channel_error("6", "t", "channel_crash"),
            br#"["6","6","t","phx_error",{"reason":"channel_crash"}]"#
        );
    }
}
