//! Our RFC 6455 frame layer: handshake key, frame parsing and encoding. No I/O.
//!
//! Why our own layer rather than tokio-tungstenite: a connection that is idle must hold no buffer
//! (see ARCHITECTURE.md, "WebSocket layer"). The transport reads into a stack buffer and hands the
//! bytes to [`MessageReader::feed`]; only a frame split across reads, or a fragmented message, is
//! copied to the heap, and that copy is freed as soon as the message is complete. Outgoing frames
//! are built once (a broadcast's frame is shared by every subscriber) and written with `writev`.
//!
//! Architecture Invariant: this module knows nothing of Phoenix; it turns bytes into
//! [`Message`]s and back, and reports protocol violations with the close code they deserve.

use base64::Engine;
use sha1::{Digest, Sha1};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest server frame header: 2 bytes + 8 bytes of extended length (servers do not mask).
pub const MAX_HEADER: usize = 10;

/// Close codes we send. We never send 1000 (see PHOENIX-PROTOCOL.md §1.6).
pub mod close_code {
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    pub const RESTART: u16 = 1012;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// A protocol violation by the peer, with the close code to answer it with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (close {code})")]
pub struct WsError {
    pub code: u16,
    pub reason: &'static str,
}

fn protocol(reason: &'static str) -> WsError {
    WsError {
        code: close_code::PROTOCOL_ERROR,
        reason,
    }
}

/// A complete message from the peer. Slices borrow the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Text(&'a [u8]),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong,
    /// The peer's close code (if any) and reason.
    Close(Option<u16>, &'a [u8]),
}

/// What the consumer wants after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Reassembles frames into messages. Holds heap memory only while a frame or a fragmented
/// message is incomplete.
#[derive(Debug, Default)]
pub struct MessageReader {
    /// Bytes of a frame that did not arrive whole.
    partial: Vec<u8>,
    /// Opcode and data of a fragmented message in progress.
    fragments: Option<(u8, Vec<u8>)>,
}

struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

/// Parses a client frame header; `Ok(None)` means more bytes are needed.
fn parse_header(buf: &[u8], max_payload: usize) -> Result<Option<Header>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(protocol("reserved bits set without a negotiated extension"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin {
                return Err(protocol("fragmented control frame"));
            }
        }
        _ => return Err(protocol("unknown opcode")),
    }
    if b1 & 0x80 == 0 {
        return Err(protocol("client frames must be masked"));
    }
    let len7 = (b1 & 0x7F) as usize;
    let (payload_len, mut at) = match len7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(b);
            if n >> 63 != 0 {
                return Err(protocol("frame length has the high bit set"));
            }
            (usize::try_from(n).unwrap_or(usize::MAX), 10)
        }
        n => (n, 2),
    };
    if opcode >= OP_CLOSE && payload_len > 125 {
        return Err(protocol("control frame longer than 125 bytes"));
    }
    if payload_len > max_payload {
        return Err(WsError {
            code: close_code::TOO_BIG,
            reason: "frame exceeds the size limit",
        });
    }
    if buf.len() < at + 4 {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[at..at + 4]);
    at += 4;
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        header_len: at,
        payload_len,
    }))
}

fn unmask(data: &mut [u8], mask: [u8; 4]) {
    // Word-at-a-time unmasking; the remainder byte by byte.
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

impl MessageReader {
    /// True when no partial frame or message is buffered.
    pub fn is_idle(&self) -> bool {
        self.partial.is_empty() && self.fragments.is_none()
    }

    /// Feeds bytes read from the socket; calls `on_message` for each complete message.
    /// `max_message` bounds a frame and a reassembled message alike.
    pub fn feed(
        &mut self,
        data: &mut [u8],
        max_message: usize,
        on_message: &mut dyn FnMut(Message<'_>) -> Flow,
    ) -> Result<Flow, WsError> {
        if self.partial.is_empty() {
            let (consumed, flow) = self.process(data, max_message, on_message)?;
            if flow == Flow::Continue && consumed < data.len() {
                self.partial.extend_from_slice(&data[consumed..]);
            }
            return Ok(flow);
        }
        let mut buf = std::mem::take(&mut self.partial);
        buf.extend_from_slice(data);
        let (consumed, flow) = self.process(&mut buf, max_message, on_message)?;
        if consumed < buf.len() && flow == Flow::Continue {
            buf.drain(..consumed);
            self.partial = buf;
        }
        // Otherwise `buf` is dropped here: an idle connection keeps no read buffer.
        Ok(flow)
    }

    fn process(
        &mut self,
        buf: &mut [u8],
        max_message: usize,
        on_message: &mut dyn FnMut(Message<'_>) -> Flow,
    ) -> Result<(usize, Flow), WsError> {
        let mut at = 0;
        loop {
            let Some(h) = parse_header(&buf[at..], max_message)? else {
                return Ok((at, Flow::Continue));
            };
            let end = at + h.header_len + h.payload_len;
            if buf.len() < end {
                return Ok((at, Flow::Continue));
            }
            let payload = &mut buf[at + h.header_len..end];
            unmask(payload, h.mask);
            at = end;
            let flow = self.on_frame(&h, payload, max_message, on_message)?;
            if flow == Flow::Stop {
                return Ok((at, Flow::Stop));
            }
        }
    }

    fn on_frame(
        &mut self,
        h: &Header,
        payload: &[u8],
        max_message: usize,
        on_message: &mut dyn FnMut(Message<'_>) -> Flow,
    ) -> Result<Flow, WsError> {
        match h.opcode {
            OP_PING => Ok(on_message(Message::Ping(payload))),
            OP_PONG => Ok(on_message(Message::Pong)),
            OP_CLOSE => {
                if payload.is_empty() {
                    return Ok(on_message(Message::Close(None, b"")));
                }
                if payload.len() == 1 {
                    return Err(protocol("close frame with a one-byte payload"));
                }
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                if !valid_close_code(code) {
                    return Err(protocol("invalid close code"));
                }
                let reason = &payload[2..];
                if std::str::from_utf8(reason).is_err() {
                    return Err(WsError {
                        code: close_code::INVALID_PAYLOAD,
                        reason: "close reason is not UTF-8",
                    });
                }
                Ok(on_message(Message::Close(Some(code), reason)))
            }
            OP_TEXT | OP_BINARY => {
                if self.fragments.is_some() {
                    return Err(protocol("new message before the fragmented one finished"));
                }
                if h.fin {
                    return deliver(h.opcode, payload, on_message);
                }
                self.fragments = Some((h.opcode, payload.to_vec()));
                Ok(Flow::Continue)
            }
            _ => {
                // OP_CONTINUATION
                let Some((opcode, mut data)) = self.fragments.take() else {
                    return Err(protocol("continuation frame without a message to continue"));
                };
                if data.len() + payload.len() > max_message {
                    return Err(WsError {
                        code: close_code::TOO_BIG,
                        reason: "message exceeds the size limit",
                    });
                }
                data.extend_from_slice(payload);
                if h.fin {
                    return deliver(opcode, &data, on_message);
                }
                self.fragments = Some((opcode, data));
                Ok(Flow::Continue)
            }
        }
    }
}

fn deliver(
    opcode: u8,
    data: &[u8],
    on_message: &mut dyn FnMut(Message<'_>) -> Flow,
) -> Result<Flow, WsError> {
    if opcode == OP_TEXT {
        if std::str::from_utf8(data).is_err() {
            return Err(WsError {
                code: close_code::INVALID_PAYLOAD,
                reason: "text message is not UTF-8",
            });
        }
        Ok(on_message(Message::Text(data)))
    } else {
        Ok(on_message(Message::Binary(data)))
    }
}

/// Writes a server frame header for a payload of `len` bytes; returns the header bytes used.
pub fn header(opcode: u8, len: usize) -> ([u8; MAX_HEADER], usize) {
    let mut h = [0u8; MAX_HEADER];
    h[0] = 0x80 | opcode;
    let n = if len < 126 {
        h[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (h, n)
}

/// A whole unfragmented server frame.
pub fn encode_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let (h, n) = header(opcode, payload.len());
    let mut out = Vec::with_capacity(n + payload.len());
    out.extend_from_slice(&h[..n]);
    out.extend_from_slice(payload);
    out
}

/// Turns `buf`, whose first [`MAX_HEADER`] bytes were reserved, into a frame in place and
/// returns the offset where the frame starts (the header is right-aligned in the reserve).
/// Lets a broadcast be encoded once into one allocation that holds its WebSocket frame and,
/// right after the header, its bare text for LongPoll.
pub fn frame_in_place(buf: &mut [u8], opcode: u8) -> usize {
    let len = buf.len() - MAX_HEADER;
    let (h, n) = header(opcode, len);
    let start = MAX_HEADER - n;
    buf[start..MAX_HEADER].copy_from_slice(&h[..n]);
    start
}

/// A close frame with `code` and a short reason (truncated to fit a control frame).
pub fn encode_close(code: u16, reason: &str) -> Vec<u8> {
    let mut reason = &reason.as_bytes()[..reason.len().min(123)];
    while std::str::from_utf8(reason).is_err() {
        reason = &reason[..reason.len() - 1];
    }
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason);
    encode_frame(OP_CLOSE, &payload)
}

/// The close frame that answers a peer's close: its code echoed (RFC 6455 §5.5.1), or no code
/// when it gave none (so a client that sent none sees 1005, never a 1000 we chose; see
/// PHOENIX-PROTOCOL.md §1.6).
pub fn encode_close_reply(code: Option<u16>) -> Vec<u8> {
    match code {
        Some(code) => encode_close(code, ""),
        None => encode_frame(OP_CLOSE, b""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 0xFFFF {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn collect(reader: &mut MessageReader, data: &[u8]) -> Result<Vec<String>, WsError> {
        let mut got = Vec::new();
        let mut data = data.to_vec();
        reader.feed(&mut data, 1 << 20, &mut |m| {
            got.push(match m {
                Message::Text(t) => format!("text:{}", String::from_utf8_lossy(t)),
                Message::Binary(b) => format!("binary:{}", b.len()),
                Message::Ping(p) => format!("ping:{}", p.len()),
                Message::Pong => "pong".into(),
                Message::Close(c, _) => format!("close:{c:?}"),
            });
            Flow::Continue
        })?;
        Ok(got)
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn reads_frames_split_anywhere() {
        let mut all = client_frame(true, OP_TEXT, b"hello");
        all.extend(client_frame(true, OP_BINARY, &[7u8; 300]));
        all.extend(client_frame(true, OP_PING, b"p"));
        for split in 0..all.len() {
            let mut r = MessageReader::default();
            let mut got = collect(&mut r, &all[..split]).unwrap();
            got.extend(collect(&mut r, &all[split..]).unwrap());
            assert_eq!(got, ["text:hello", "binary:300", "ping:1"], "split {split}");
            assert!(r.is_idle());
        }
    }

    #[test]
    fn reassembles_fragments_with_interleaved_control_frames() {
        let mut all = client_frame(false, OP_TEXT, b"he");
        all.extend(client_frame(true, OP_PING, b""));
        all.extend(client_frame(false, OP_CONTINUATION, b"ll"));
        all.extend(client_frame(true, OP_CONTINUATION, b"o"));
        let mut r = MessageReader::default();
        assert_eq!(collect(&mut r, &all).unwrap(), ["ping:0", "text:hello"]);
        assert!(r.is_idle());
    }

    #[test]
    fn rejects_violations_with_the_right_code() {
        let code = |bytes: Vec<u8>| {
            collect(&mut MessageReader::default(), &bytes)
                .unwrap_err()
                .code
        };
        let mut unmasked = client_frame(true, OP_TEXT, b"x");
        unmasked[1] &= 0x7F;
        assert_eq!(code(unmasked), 1002);
        let mut rsv = client_frame(true, OP_TEXT, b"x");
        rsv[0] |= 0x40;
        assert_eq!(code(rsv), 1002);
        assert_eq!(code(client_frame(true, 3, b"")), 1002);
        assert_eq!(code(client_frame(false, OP_PING, b"")), 1002);
        assert_eq!(code(client_frame(true, OP_PING, &[0; 126])), 1002);
        assert_eq!(code(client_frame(true, OP_CONTINUATION, b"x")), 1002);
        assert_eq!(code(client_frame(true, OP_TEXT, &[0xff, 0xfe])), 1007);
        assert_eq!(code(client_frame(true, OP_CLOSE, &[3])), 1002);
        assert_eq!(code(client_frame(true, OP_CLOSE, &[0x03, 0xe7])), 1002);
        let mut twice = client_frame(false, OP_TEXT, b"a");
        twice.extend(client_frame(true, OP_TEXT, b"b"));
        assert_eq!(code(twice), 1002);
    }

    #[test]
    fn enforces_the_size_limit_on_frames_and_messages() {
        let mut r = MessageReader::default();
        let mut big = client_frame(true, OP_TEXT, &[b'a'; 200]);
        let err = r.feed(&mut big, 100, &mut |_| Flow::Continue).unwrap_err();
        assert_eq!(err.code, 1009);
        let mut r = MessageReader::default();
        let mut frags = client_frame(false, OP_TEXT, &[b'a'; 80]);
        frags.extend(client_frame(true, OP_CONTINUATION, &[b'a'; 80]));
        let err = r
            .feed(&mut frags, 100, &mut |_| Flow::Continue)
            .unwrap_err();
        assert_eq!(err.code, 1009);
    }

    #[test]
    fn a_close_is_answered_with_its_own_code_or_none() {
        assert_eq!(encode_close_reply(Some(4001)), [0x88, 2, 0x0f, 0xa1]);
        assert_eq!(encode_close_reply(Some(1000)), [0x88, 2, 0x03, 0xe8]);
        assert_eq!(encode_close_reply(None), [0x88, 0]);
    }

    #[test]
    fn encodes_headers_for_each_length_class() {
        assert_eq!(&encode_frame(OP_TEXT, b"hi")[..2], &[0x81, 2]);
        let f = encode_frame(OP_BINARY, &[0; 200]);
        assert_eq!(&f[..4], &[0x82, 126, 0, 200]);
        let f = encode_frame(OP_TEXT, &vec![0; 70000]);
        assert_eq!(&f[..2], &[0x81, 127]);
        assert_eq!(f.len(), 70010);
        let mut buf = vec![0u8; MAX_HEADER];
        buf.extend_from_slice(b"abc");
        let start = frame_in_place(&mut buf, OP_TEXT);
        assert_eq!(&buf[start..], &[0x81, 3, b'a', b'b', b'c']);
        assert_eq!(encode_close(1012, "restart")[..4], [0x88, 9, 0x03, 0xf4]);
    }
}
