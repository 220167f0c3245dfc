//! The WebSocket frame parser and message assembly (`ws::MessageReader`), fed client bytes.
//!
//! Properties:
//! - the messages and the violation (its close code) are those of a reference reader written
//!   from RFC 6455 (`ws_model`), and the reader is idle exactly when nothing is left over;
//! - how the bytes are split across reads changes nothing;
//! - every frame it accepted re-encodes, from its fields, to the bytes it came in;
//! - each message it delivered, sent again as one minimal frame, is read back the same, and the
//!   server's own encoders (`encode_frame`, `encode_close_reply`) produce frames RFC 6455 reads
//!   back to the same opcode and payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pushgate::ws::{self, Flow, MessageReader};
use pushgate_fuzz::ws_model::{self, Msg};
use pushgate_fuzz::{Cursor, decode_server_frame};

/// Feeds `data` in pieces ending at `cuts`; the messages and the first violation.
fn feed(data: &[u8], cuts: &[usize], max: usize) -> (Vec<Msg>, Option<u16>, bool) {
    let mut reader = MessageReader::default();
    let mut got = Vec::new();
    let mut from = 0;
    for &to in cuts.iter().chain(std::iter::once(&data.len())) {
        let to = to.clamp(from, data.len());
        let mut piece = data[from..to].to_vec();
        from = to;
        let r = reader.feed(&mut piece, max, &mut |m| {
            got.push(Msg::of(&m));
            Flow::Continue
        });
        if let Err(e) = r {
            return (got, Some(e.code), false);
        }
    }
    (got, None, reader.is_idle())
}

fn reencode(m: &Msg) -> Vec<u8> {
    let (opcode, payload) = match m {
        Msg::Text(t) => (ws::OP_TEXT, t.clone()),
        Msg::Binary(b) => (ws::OP_BINARY, b.clone()),
        Msg::Ping(p) => (ws::OP_PING, p.clone()),
        Msg::Pong => (ws::OP_PONG, Vec::new()),
        Msg::Close(None, _) => (ws::OP_CLOSE, Vec::new()),
        Msg::Close(Some(c), r) => {
            let mut p = c.to_be_bytes().to_vec();
            p.extend_from_slice(r);
            (ws::OP_CLOSE, p)
        }
    };
    let frame = ws_model::Frame {
        start: 0,
        end: 0,
        fin: true,
        opcode,
        len_width: match payload.len() {
            0..=125 => 0,
            126..=0xffff => 2,
            _ => 8,
        },
        mask: [0xa1, 0x05, 0x7e, 0x33],
        payload,
    };
    frame.encode()
}

fuzz_target!(|input: &[u8]| {
    let mut c = Cursor::new(input);
    // The size limit: small ones exercise 1009, the default (`limits.max_frame_bytes`) the rest.
    let max = match c.byte() % 4 {
        0 => 0,
        1 => 126 + c.byte() as usize,
        2 => 0x10000 + c.u16() as usize,
        _ => 65536,
    };
    let cut_a = c.u16() as usize;
    let cut_b = c.u16() as usize;
    let data = c.rest();

    let model = ws_model::read(data, max);
    let whole = feed(data, &[], max);
    assert_eq!(
        whole.0, model.messages,
        "messages differ from RFC 6455's reading"
    );
    assert_eq!(
        whole.1, model.error,
        "violation differs from RFC 6455's reading"
    );
    if model.error.is_none() {
        assert_eq!(whole.2, model.idle, "leftover bytes");
    }
    let mut cuts = [cut_a % (data.len() + 1), cut_b % (data.len() + 1)];
    cuts.sort();
    let split = feed(data, &cuts, max);
    assert_eq!(
        split, whole,
        "splitting the reads at {cuts:?} changed the result"
    );
    let one_byte_cuts: Vec<usize> = (1..data.len().min(64)).collect();
    if data.len() <= 64 {
        assert_eq!(feed(data, &one_byte_cuts, max), whole, "byte-by-byte reads");
    }

    for f in &model.frames {
        assert_eq!(
            f.encode(),
            &data[f.start..f.end],
            "frame does not re-encode"
        );
    }
    for m in &whole.0 {
        let again = feed(&reencode(m), &[], max.max(125));
        assert_eq!(
            again.0,
            vec![m.clone()],
            "a delivered message does not read back"
        );
        assert_eq!(again.1, None);
        // What the server sends back.
        let (opcode, payload) = match m {
            Msg::Text(t) => (ws::OP_TEXT, t.as_slice()),
            Msg::Binary(b) => (ws::OP_BINARY, b.as_slice()),
            Msg::Ping(p) => (ws::OP_PONG, p.as_slice()),
            Msg::Close(code, _) => {
                let reply = ws::encode_close_reply(*code);
                let (fin, op, p) = decode_server_frame(&reply).expect("a close reply frame");
                assert!(fin && op == ws::OP_CLOSE);
                match code {
                    None => assert!(p.is_empty()),
                    Some(code) => assert_eq!(p, code.to_be_bytes(), "close code not echoed"),
                }
                continue;
            }
            Msg::Pong => continue,
        };
        let frame = ws::encode_frame(opcode, payload);
        assert_eq!(decode_server_frame(&frame), Some((true, opcode, payload)));
    }
});
