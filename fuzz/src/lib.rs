//! What the fuzz targets share: a byte cursor to split an input into parts, reference decoders
//! written from the specifications (RFC 6455, PHOENIX-PROTOCOL.md §1.3) independently of the
//! gateway's, and a runtime for the targets that drive async code.
#![forbid(unsafe_code)]

pub mod json;
pub mod ws_model;

/// Splits a fuzz input into parts: a few fixed-size choices first, then byte strings.
pub struct Cursor<'a> {
    pub data: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data }
    }

    /// One byte (0 once the input is used up).
    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    /// Bytes up to the next `sep` (or the end), `sep` consumed.
    pub fn until(&mut self, sep: u8) -> &'a [u8] {
        match self.data.iter().position(|b| *b == sep) {
            Some(i) => {
                let (part, rest) = self.data.split_at(i);
                self.data = &rest[1..];
                part
            }
            None => std::mem::take(&mut self.data),
        }
    }

    /// The rest.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// A current-thread runtime with paused time (timers fire as soon as nothing else can run), one
/// per fuzzing thread.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime");
    }
    RT.with(|rt| rt.block_on(f))
}

/// A server (unmasked) frame, decoded as RFC 6455 §5.2 reads it: `(fin, opcode, payload)`
/// and the bytes it took, or `None` when `buf` is not exactly one minimally encoded frame.
pub fn decode_server_frame(buf: &[u8]) -> Option<(bool, u8, &[u8])> {
    if buf.len() < 2 || buf[0] & 0x70 != 0 || buf[1] & 0x80 != 0 {
        return None;
    }
    let (len, at) = match buf[1] & 0x7f {
        126 => {
            let n = u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize;
            if n < 126 {
                return None;
            }
            (n, 4)
        }
        127 => {
            let n = u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?);
            if n <= 0xffff || n >> 63 != 0 {
                return None;
            }
            (usize::try_from(n).ok()?, 10)
        }
        n => (n as usize, 2),
    };
    if buf.len() != at + len {
        return None;
    }
    Some((buf[0] & 0x80 != 0, buf[0] & 0x0f, &buf[at..]))
}

/// A Phoenix V2 binary frame (PHOENIX-PROTOCOL.md §1.3): the kind, then one length byte per
/// field, the fields, the payload. Written from the spec, not from `pushgate::protocol`.
pub fn encode_binary(kind: u8, fields: &[&[u8]], payload: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    for f in fields {
        out.push(u8::try_from(f.len()).expect("a field of at most 255 bytes"));
    }
    for f in fields {
        out.extend_from_slice(f);
    }
    out.extend_from_slice(payload);
    out
}

/// The inverse of [`encode_binary`] for a frame of `kind` with `n` fields.
pub fn decode_binary(frame: &[u8], kind: u8, n: usize) -> Option<(Vec<&[u8]>, &[u8])> {
    if frame.len() < 1 + n || frame[0] != kind {
        return None;
    }
    let lens = &frame[1..1 + n];
    let mut at = 1 + n;
    let mut fields = Vec::with_capacity(n);
    for len in lens {
        let end = at + *len as usize;
        fields.push(frame.get(at..end)?);
        at = end;
    }
    Some((fields, &frame[at..]))
}
