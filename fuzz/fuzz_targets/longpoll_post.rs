//! LongPoll ndjson POST bodies, through `longpoll::post` into a real session of a real `App`
//! (embedded broker), then read back with a poll as a client would.
//!
//! Properties:
//! - a body of more non-empty lines (`\n`, or `\r\n`) than `longpoll.max_post_lines` is refused
//!   with 413, any other body is taken (200);
//! - every message the following poll returns is a JSON string holding a Phoenix V2 text frame;
//! - each heartbeat line is answered `ok` and each line that is neither a message nor valid
//!   base64 of a binary push is answered with an error reply carrying the refs and topic it
//!   could recover, in the order of the lines.
#![no_main]

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use pushgate::protocol;
use pushgate::transport::longpoll::{self, Get};
use pushgate_fuzz::Cursor;
use serde_json::Value;

/// `(join_ref, ref, topic, status)` of a reply.
type Reply = (Option<String>, Option<String>, String, String);

fn status(body: &[u8]) -> Value {
    serde_json::from_slice(body).expect("a LongPoll answer is JSON")
}

fuzz_target!(|input: &[u8]| {
    let mut c = Cursor::new(input);
    let max_lines = 1 + (c.byte() % 16) as usize;
    let body = c.rest();
    let mut config = pushgate::Config::default();
    config.longpoll.max_post_lines = max_lines;
    let app = pushgate::App::new(config, tokio_util::sync::CancellationToken::new());

    // The lines as ndjson reads them, and the replies a client must get for some of them.
    let lines: Vec<&[u8]> = body
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.is_empty())
        .collect();
    let mut expected: Vec<Reply> = Vec::new();
    for line in &lines {
        let parsed = if line[0] == b'[' {
            protocol::parse_text(line)
        } else {
            match base64::engine::general_purpose::STANDARD.decode(line) {
                Ok(bin) => protocol::parse_binary(&bin),
                Err(_) => {
                    expected.push((None, None, "phoenix".into(), "error".into()));
                    continue;
                }
            }
        };
        match parsed {
            Ok(m) if m.topic == "phoenix" && m.event == "heartbeat" => {
                expected.push((m.join_ref, m.msg_ref, m.topic, "ok".into()))
            }
            Ok(_) => {}
            Err(e) => expected.push((
                e.join_ref,
                e.msg_ref,
                e.topic.unwrap_or_else(|| "phoenix".into()),
                "error".into(),
            )),
        }
    }

    pushgate_fuzz::block_on(check(&app, &lines, &expected, body, max_lines));
    pushgate::fuzzing::drop_longpoll_sessions(&app);
});

async fn check(
    app: &std::sync::Arc<pushgate::App>,
    lines: &[&[u8]],
    expected: &[Reply],
    body: &[u8],
    max_lines: usize,
) {
    {
        let Get::Done(first) = Get::begin(app, None, "vsn=2.0.0", None, None) else {
            panic!("a first GET opens a session");
        };
        let token = status(&first)["token"]
            .as_str()
            .expect("a token")
            .to_string();
        let answer = status(&longpoll::post(app, Some(&token), body).await);
        if lines.len() > max_lines {
            assert_eq!(
                answer["status"],
                413,
                "{} lines, at most {max_lines}",
                lines.len()
            );
            return;
        }
        assert_eq!(answer["status"], 200);

        let get = Get::begin(app, Some(&token), "vsn=2.0.0", None, None);
        let polled = status(&get.finish(app.clone()).await);
        let messages = polled["messages"].as_array().cloned().unwrap_or_default();
        let mut replies: Vec<Reply> = Vec::new();
        for m in &messages {
            let text = m.as_str().expect("each message is a JSON string");
            let frame = protocol::parse_text(text.as_bytes())
                .unwrap_or_else(|e| panic!("we sent a frame that does not decode: {e}: {text}"));
            if frame.event == "phx_reply" {
                let protocol::Payload::Json(p) = &frame.payload else {
                    panic!("a reply with a binary payload");
                };
                let p: Value = serde_json::from_str(p.get()).expect("a JSON reply payload");
                let st = p["status"].as_str().expect("a reply status").to_string();
                replies.push((frame.join_ref, frame.msg_ref, frame.topic, st));
            }
        }
        // The expected replies come in order among the replies (others answer joins, pushes...).
        let mut want = expected.iter().peekable();
        for r in &replies {
            if want.peek() == Some(&r) {
                want.next();
            }
        }
        assert!(
            want.peek().is_none(),
            "missing reply {:?}; got {replies:?}",
            want.peek()
        );
    }
}
