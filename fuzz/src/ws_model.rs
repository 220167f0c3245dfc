//! A reference reader of client WebSocket frames and messages, written from RFC 6455 (§5.2
//! framing, §5.4 fragmentation, §5.5 control frames, §7.4 close codes, §8.1 UTF-8) with the
//! gateway's documented choices (`limits.max_frame_bytes` bounds a frame and a message, 1009).

/// A message, as the gateway's `ws::Message` carries it, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close(Option<u16>, Vec<u8>),
}

impl Msg {
    pub fn of(m: &pushgate::ws::Message<'_>) -> Msg {
        use pushgate::ws::Message;
        match m {
            Message::Text(t) => Msg::Text(t.to_vec()),
            Message::Binary(b) => Msg::Binary(b.to_vec()),
            Message::Ping(p) => Msg::Ping(p.to_vec()),
            Message::Pong => Msg::Pong,
            Message::Close(c, r) => Msg::Close(*c, r.to_vec()),
        }
    }
}

/// One complete frame of the input.
#[derive(Debug, Clone)]
pub struct Frame {
    pub start: usize,
    pub end: usize,
    pub fin: bool,
    pub opcode: u8,
    /// Bytes of extended length: 0, 2 or 8.
    pub len_width: usize,
    pub mask: [u8; 4],
    /// Unmasked.
    pub payload: Vec<u8>,
}

impl Frame {
    /// The frame's bytes from its fields (a client frame: masked).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![(if self.fin { 0x80 } else { 0 }) | self.opcode];
        let len = self.payload.len();
        match self.len_width {
            0 => out.push(0x80 | len as u8),
            2 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&self.mask);
        out.extend(
            self.payload
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ self.mask[i % 4]),
        );
        out
    }
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub messages: Vec<Msg>,
    /// The close code of the first violation.
    pub error: Option<u16>,
    /// No partial frame and no fragmented message left (meaningful without an error).
    pub idle: bool,
    pub frames: Vec<Frame>,
}

/// RFC 6455 §7.4: codes a peer may send (1004-1006 and 1015 never on the wire; 1012-1014 are
/// registered with IANA), and the private ranges.
fn sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Reads `data` as a client would have sent it, whole.
pub fn read(data: &[u8], max: usize) -> Outcome {
    let mut o = Outcome::default();
    let mut at = 0;
    let mut fragmented: Option<(u8, Vec<u8>)> = None;
    let fail = |mut o: Outcome, code| {
        o.error = Some(code);
        o
    };
    loop {
        let rest = &data[at..];
        if rest.len() < 2 {
            o.idle = rest.is_empty() && fragmented.is_none();
            return o;
        }
        let (b0, b1) = (rest[0], rest[1]);
        if b0 & 0x70 != 0 {
            return fail(o, 1002);
        }
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0f;
        let control = opcode & 0x8 != 0;
        if !matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10) {
            return fail(o, 1002);
        }
        if control && !fin {
            return fail(o, 1002);
        }
        if b1 & 0x80 == 0 {
            return fail(o, 1002);
        }
        let (len, len_width) = match b1 & 0x7f {
            126 => match rest.get(2..4) {
                Some(b) => (u16::from_be_bytes([b[0], b[1]]) as u64, 2),
                None => {
                    o.idle = false;
                    return o;
                }
            },
            127 => match rest.get(2..10) {
                Some(b) => (u64::from_be_bytes(b.try_into().unwrap()), 8),
                None => {
                    o.idle = false;
                    return o;
                }
            },
            n => (n as u64, 0),
        };
        if len >> 63 != 0 {
            return fail(o, 1002);
        }
        if control && len > 125 {
            return fail(o, 1002);
        }
        if len > max as u64 {
            return fail(o, 1009);
        }
        let len = len as usize;
        let header = 2 + len_width + 4;
        if rest.len() < header + len {
            o.idle = false;
            return o;
        }
        let mask: [u8; 4] = rest[2 + len_width..header].try_into().unwrap();
        let payload: Vec<u8> = rest[header..header + len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        o.frames.push(Frame {
            start: at,
            end: at + header + len,
            fin,
            opcode,
            len_width,
            mask,
            payload: payload.clone(),
        });
        at += header + len;
        match opcode {
            9 => o.messages.push(Msg::Ping(payload)),
            10 => o.messages.push(Msg::Pong),
            8 => {
                if payload.is_empty() {
                    o.messages.push(Msg::Close(None, Vec::new()));
                    continue;
                }
                if payload.len() == 1 {
                    return fail(o, 1002);
                }
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                if !sendable_close_code(code) {
                    return fail(o, 1002);
                }
                if std::str::from_utf8(&payload[2..]).is_err() {
                    return fail(o, 1007);
                }
                o.messages
                    .push(Msg::Close(Some(code), payload[2..].to_vec()));
            }
            1 | 2 => {
                if fragmented.is_some() {
                    return fail(o, 1002);
                }
                if fin {
                    if opcode == 1 && std::str::from_utf8(&payload).is_err() {
                        return fail(o, 1007);
                    }
                    o.messages.push(if opcode == 1 {
                        Msg::Text(payload)
                    } else {
                        Msg::Binary(payload)
                    });
                } else {
                    fragmented = Some((opcode, payload));
                }
            }
            _ => {
                let Some((first, mut so_far)) = fragmented.take() else {
                    return fail(o, 1002);
                };
                if so_far.len() + payload.len() > max {
                    return fail(o, 1009);
                }
                so_far.extend_from_slice(&payload);
                if fin {
                    if first == 1 && std::str::from_utf8(&so_far).is_err() {
                        return fail(o, 1007);
                    }
                    o.messages.push(if first == 1 {
                        Msg::Text(so_far)
                    } else {
                        Msg::Binary(so_far)
                    });
                } else {
                    fragmented = Some((first, so_far));
                }
            }
        }
    }
}
