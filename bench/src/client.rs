//! Minimal, cheap clients: WebSocket (RFC 6455 client side), LongPoll (Phoenix and Nchan) and a
//! keep-alive HTTP/1.1 publisher. Written for the load generator: a read buffer per connection,
//! no JSON parsing of messages beyond finding two numbers. LongPoll also runs over HTTP/2 ([`H2`],
//! the h2 crate over the same TLS), as browsers speak it to the shipped nginx site.

use std::future::Future;
use std::io;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

/// Which server protocol to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Adapter {
    /// pushgate: Phoenix Channels V2 (join per topic), POST /api/publish.
    Phoenix,
    /// Nchan: raw WebSocket / long-poll at /sub/<topic>, POST /pub/<topic>.
    Nchan,
}

/// Marker keys the publisher puts in every payload, chosen not to collide with protocol words.
pub const SEQ_KEY: &[u8] = b"pgseq";
pub const TS_KEY: &[u8] = b"pgts";

pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The JSON payload of message `seq`, stamped `ts` (wall-clock µs; latency is measured from
/// it), padded to about `size` bytes.
pub fn payload(seq: u64, ts: u64, size: usize) -> String {
    let head = format!("{{\"pgseq\":{seq},\"pgts\":{ts},\"pad\":\"");
    let pad = size.saturating_sub(head.len() + 2);
    let mut s = String::with_capacity(head.len() + pad + 2);
    s.push_str(&head);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

/// Finds every (seq, ts) pair in `data` (a frame, or a LongPoll body with many escaped frames).
pub fn scan_messages(data: &[u8], mut f: impl FnMut(u64, u64)) {
    let mut at = 0;
    while let Some(i) = find(&data[at..], SEQ_KEY) {
        let start = at + i + SEQ_KEY.len();
        let (seq, after) = number_after(data, start);
        let Some(j) = find(&data[after..], TS_KEY) else {
            break;
        };
        let (ts, after_ts) = number_after(data, after + j + TS_KEY.len());
        f(seq, ts);
        at = after_ts;
    }
}

/// Where `needle` first occurs in `hay`: candidates by their first byte, then compared whole
/// (a slice comparison at every position costs more than the rest of a LongPoll delivery).
/// The `token` of a LongPoll answer (pushgate writes it right after the status, unescaped).
pub fn lp_token(body: &[u8]) -> Option<&[u8]> {
    const KEY: &[u8] = b"\"token\":\"";
    let start = find(body, KEY)? + KEY.len();
    let len = body[start..].iter().position(|&b| b == b'"')?;
    Some(&body[start..start + len])
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, _) = needle.split_first()?;
    let mut at = 0;
    while let Some(i) = hay.get(at..)?.iter().position(|&b| b == first) {
        if hay[at + i..].starts_with(needle) {
            return Some(at + i);
        }
        at += i + 1;
    }
    None
}

/// The `status` of a Phoenix LongPoll answer (pushgate writes it first; searched otherwise).
pub fn lp_status(body: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"status\":";
    let at = if body.get(1..).is_some_and(|b| b.starts_with(KEY)) {
        1
    } else {
        find(body, KEY)?
    };
    Some(number_after(body, at + KEY.len()).0)
}

fn number_after(data: &[u8], mut i: usize) -> (u64, usize) {
    while i < data.len() && !data[i].is_ascii_digit() {
        i += 1;
    }
    let mut n = 0u64;
    while i < data.len() && data[i].is_ascii_digit() {
        n = n * 10 + (data[i] - b'0') as u64;
        i += 1;
    }
    (n, i)
}

/// TLS to the server under test (the stack: nginx in front, as deployed): the CA to trust and
/// the name to ask for. Set once per process by [`use_tls`]; subscribers then speak `wss://`
/// and LongPoll over `https://` (HTTP/1.1, by ALPN; HTTP/2 with [`H2`]), publishers stay on plain
/// HTTP.
struct Tls {
    connector: tokio_rustls::TlsConnector,
    /// The same, offering only "h2" by ALPN: LongPoll over HTTP/2 ([`H2`]).
    connector_h2: tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
}

static TLS: OnceLock<Tls> = OnceLock::new();

/// Subscribers connect over TLS, trusting the CA certificates in the PEM file `ca` and asking
/// for `name` (SNI, and the name the server's certificate must carry).
pub fn use_tls(ca: &Path, name: &str) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // The load generator speaks HTTP/1.1 (WebSockets through nginx need it anyway), and h2 only
    // where asked for (below).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // LongPoll over HTTP/2 only (`run longpoll --http2`): its own connector, so the others
    // never offer h2.
    let mut config_h2 = config.clone();
    config_h2.alpn_protocols = vec![b"h2".to_vec()];
    let name = ServerName::try_from(name.to_string()).map_err(|e| format!("{name}: {e}"))?;
    let tls = Tls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        connector_h2: tokio_rustls::TlsConnector::from(Arc::new(config_h2)),
        name,
    };
    TLS.set(tls).map_err(|_| "TLS is already set".to_string())
}

/// A connection to the server: plain TCP, or TLS over it.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Stream {
    /// Writes all of `data` and flushes it (TLS may hold a record back until flushed).
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_all(data).await?;
        if let Stream::Tls(s) = self {
            s.flush().await?;
        }
        Ok(())
    }
}

/// Connects from `source` (any 127.x.y.z) to `server`; over TLS when `secure` and [`use_tls`]
/// was called.
pub async fn connect_from(source: IpAddr, server: SocketAddr, secure: bool) -> io::Result<Stream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source, 0))?;
    let s = sock.connect(server).await?;
    s.set_nodelay(true)?;
    match TLS.get().filter(|_| secure) {
        Some(t) => Ok(Stream::Tls(Box::new(
            t.connector.connect(t.name.clone(), s).await?,
        ))),
        None => Ok(Stream::Plain(s)),
    }
}

/// The Host header for `server`: the TLS name when the connection is secure.
fn host_of(server: SocketAddr, secure: bool) -> String {
    match TLS.get().filter(|_| secure) {
        Some(t) => format!("{}:{}", t.name.to_str(), server.port()),
        None => server.to_string(),
    }
}

/// Reads an HTTP response head into `buf`; returns (status, length of the head, where the
/// bytes after it start).
pub async fn read_head(s: &mut Stream, buf: &mut Vec<u8>) -> io::Result<(u16, usize, usize)> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let status = std::str::from_utf8(buf.get(9..12).unwrap_or_default())
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| io::Error::other("bad status line"))?;
            return Ok((status, end, end + 4));
        }
        buf.reserve(4096);
        if s.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

fn content_length(head: &[u8]) -> usize {
    head.split(|&b| b == b'\n')
        .find_map(|l| {
            let colon = l.iter().position(|&b| b == b':')?;
            l[..colon]
                .eq_ignore_ascii_case(b"content-length")
                .then(|| number_after(l, colon + 1).0 as usize)
        })
        .unwrap_or(0)
}

pub fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// One keep-alive HTTP/1.1 connection for request/response exchanges.
pub struct Http {
    stream: Stream,
    host: String,
    buf: Vec<u8>,
    out: Vec<u8>,
    source: IpAddr,
    server: SocketAddr,
    secure: bool,
}

impl Http {
    /// A plain connection (publishers, and the servers' own endpoints).
    pub async fn connect(source: IpAddr, server: SocketAddr) -> io::Result<Http> {
        Self::connect_as(source, server, false).await
    }

    /// A subscriber's connection: over TLS when [`use_tls`] was called.
    pub async fn connect_secure(source: IpAddr, server: SocketAddr) -> io::Result<Http> {
        Self::connect_as(source, server, true).await
    }

    async fn connect_as(source: IpAddr, server: SocketAddr, secure: bool) -> io::Result<Http> {
        Ok(Http {
            stream: connect_from(source, server, secure).await?,
            host: host_of(server, secure),
            buf: Vec::with_capacity(4096),
            out: Vec::with_capacity(512),
            source,
            server,
            secure,
        })
    }

    /// Like [`Http::request_once`], reconnecting once if the server had closed the idle
    /// keep-alive connection (as nginx does after `keepalive_requests`).
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &str,
        body: &[u8],
    ) -> io::Result<Reply<'_>> {
        let (status, head_end, body) = match self.request_once(method, path, headers, body).await {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                self.stream = connect_from(self.source, self.server, self.secure).await?;
                self.request_once(method, path, headers, body).await
            }
            r => r,
        }?;
        Ok(Reply {
            status,
            head: std::str::from_utf8(&self.buf[..head_end]).unwrap_or_default(),
            body: &self.buf[body],
        })
    }

    /// Sends a request and reads the whole response (Content-Length bodies only) into the
    /// connection's buffer; returns the status, the head's length and where the body is. The
    /// request is written from a buffer the connection keeps: nothing is allocated per request.
    async fn request_once(
        &mut self,
        method: &str,
        path: &str,
        headers: &str,
        body: &[u8],
    ) -> io::Result<(u16, usize, std::ops::Range<usize>)> {
        self.out.clear();
        // Writing into a Vec cannot fail.
        let _ = write!(
            self.out,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n{headers}\r\n",
            self.host,
            body.len()
        );
        self.out.extend_from_slice(body);
        self.stream.send(&self.out).await?;
        self.buf.clear();
        let (status, head_end, body_start) = read_head(&mut self.stream, &mut self.buf).await?;
        let len = content_length(&self.buf[..head_end]);
        while self.buf.len() < body_start + len {
            self.buf.reserve(body_start + len - self.buf.len());
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok((status, head_end, body_start..body_start + len))
    }
}

/// A response, borrowed from its connection's buffer until the next request.
pub struct Reply<'a> {
    pub status: u16,
    pub head: &'a str,
    pub body: &'a [u8],
}

/// A subscriber's request/response connection: [`Http`] (HTTP/1.1) or [`H2`] (HTTP/2). The
/// LongPoll subscriber is generic over it, so both speak the same protocol with the same checks.
pub trait Exchange {
    /// Sends a request (`headers`: "Name: value\r\n" lines) and reads the whole response.
    fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &str,
        body: &[u8],
    ) -> impl Future<Output = io::Result<Reply<'_>>>;
}

impl Exchange for Http {
    fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &str,
        body: &[u8],
    ) -> impl Future<Output = io::Result<Reply<'_>>> {
        Http::request(self, method, path, headers, body)
    }
}

/// The (name, value) pairs of "Name: value\r\n" header lines, as [`Http`] takes them.
pub fn header_lines(headers: &str) -> impl Iterator<Item = io::Result<(&str, &str)>> {
    headers
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .map(|l| match l.split_once(':') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim(), v.trim())),
            _ => Err(io::Error::other(format!("bad header line {l:?}"))),
        })
}

/// TLS with ALPN "h2" from `source` to `server`; an error unless the server chose h2.
async fn connect_h2_tls(
    source: IpAddr,
    server: SocketAddr,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let t = TLS
        .get()
        .ok_or_else(|| io::Error::other("HTTP/2 needs TLS (--tls-ca)"))?;
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source, 0))?;
    let s = sock.connect(server).await?;
    s.set_nodelay(true)?;
    let s = t
        .connector_h2
        .connect(t.name.clone(), s)
        .await
        .map_err(|e| match e.to_string() {
            // rustls names the alert so.
            m if m.contains("NoApplicationProtocol") => io::Error::new(
                e.kind(),
                format!("{server} does not speak HTTP/2: it refused ALPN h2 ({m})"),
            ),
            m => io::Error::new(e.kind(), format!("TLS to {server}: {m}")),
        })?;
    match s.get_ref().1.alpn_protocol() {
        Some(b"h2") => Ok(s),
        other => Err(io::Error::other(format!(
            "{server} does not speak HTTP/2: ALPN offered h2, the server chose {}",
            other.map_or("nothing".to_string(), |p| String::from_utf8_lossy(p)
                .into_owned())
        ))),
    }
}

fn h2_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2: I/O error"))
    } else {
        io::Error::other(format!("h2: {e}"))
    }
}

/// One HTTP/2 connection (TLS, ALPN h2) carrying a subscriber's requests one stream after
/// another, as a browser tab's LongPoll does through nginx. Reconnects once when the server
/// has sent GOAWAY (nginx does after `keepalive_requests`) or dropped the connection, like
/// [`Http::request`].
pub struct H2 {
    send: h2::client::SendRequest<bytes::Bytes>,
    /// "https://host:port", the scheme and :authority of every request.
    origin: String,
    /// The response's headers as "name: value\r\n" lines, for [`Reply::head`].
    head: String,
    buf: Vec<u8>,
    source: IpAddr,
    server: SocketAddr,
}

impl H2 {
    /// Connects over TLS (ALPN h2; [`use_tls`] must have been called) and starts HTTP/2 on it;
    /// the connection is driven by a task of its own until the last handle is dropped.
    pub async fn connect(source: IpAddr, server: SocketAddr) -> io::Result<H2> {
        Ok(H2 {
            send: Self::handshake(source, server).await?,
            origin: format!("https://{}", host_of(server, true)),
            head: String::with_capacity(256),
            buf: Vec::with_capacity(4096),
            source,
            server,
        })
    }

    async fn handshake(
        source: IpAddr,
        server: SocketAddr,
    ) -> io::Result<h2::client::SendRequest<bytes::Bytes>> {
        let tls = connect_h2_tls(source, server).await?;
        let (send, conn) = h2::client::handshake(tls).await.map_err(h2_error)?;
        tokio::spawn(async move {
            // Its errors reach the requests on it.
            let _ = conn.await;
        });
        Ok(send)
    }

    /// Whether a request that failed with `e` may be sent again on a new connection: the
    /// server refused it unprocessed (GOAWAY, REFUSED_STREAM) or the connection was gone.
    fn retryable(e: &h2::Error) -> bool {
        e.is_go_away() || e.is_io() || e.reason() == Some(h2::Reason::REFUSED_STREAM)
    }

    async fn request_once(
        &mut self,
        method: &str,
        path: &str,
        headers: &str,
        body: &[u8],
    ) -> Result<u16, Result<h2::Error, io::Error>> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.origin));
        for h in header_lines(headers) {
            let (k, v) = h.map_err(Err)?;
            req = req.header(k, v);
        }
        if !body.is_empty() {
            req = req.header(http::header::CONTENT_LENGTH, body.len());
        }
        let req = req.body(()).map_err(|e| Err(io::Error::other(e)))?;
        std::future::poll_fn(|cx| self.send.poll_ready(cx))
            .await
            .map_err(Ok)?;
        let (resp, mut stream) = self.send.send_request(req, body.is_empty()).map_err(Ok)?;
        if !body.is_empty() {
            stream
                .send_data(bytes::Bytes::copy_from_slice(body), true)
                .map_err(Ok)?;
        }
        let resp = resp.await.map_err(Ok)?;
        self.head.clear();
        for (k, v) in resp.headers() {
            // Writing into a String cannot fail.
            let _ = std::fmt::Write::write_fmt(
                &mut self.head,
                format_args!("{k}: {}\r\n", String::from_utf8_lossy(v.as_bytes())),
            );
        }
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        self.buf.clear();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(Ok)?;
            self.buf.extend_from_slice(&chunk);
            // Give the window back, or the connection stalls after 64 KiB.
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        Ok(status)
    }
}

impl Exchange for H2 {
    async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &str,
        body: &[u8],
    ) -> io::Result<Reply<'_>> {
        let status = match self.request_once(method, path, headers, body).await {
            Err(Ok(e)) if Self::retryable(&e) => {
                self.send = Self::handshake(self.source, self.server).await?;
                self.request_once(method, path, headers, body).await
            }
            r => r,
        }
        .map_err(|e| e.map_or_else(|io| io, h2_error))?;
        Ok(Reply {
            status,
            head: &self.head,
            body: &self.buf,
        })
    }
}

/// Publishes one message; returns true on success.
pub async fn publish(
    http: &mut Http,
    adapter: Adapter,
    token: &str,
    topic: &str,
    body: &str,
) -> io::Result<bool> {
    let status = match adapter {
        Adapter::Phoenix => {
            let json = format!(r#"{{"topic":"{topic}","event":"m","payload":{body}}}"#);
            let headers =
                format!("Authorization: Bearer {token}\r\nContent-Type: application/json\r\n");
            http.request("POST", "/api/publish", &headers, json.as_bytes())
                .await?
                .status
        }
        Adapter::Nchan => {
            http.request(
                "POST",
                &format!("/pub/{topic}"),
                "Content-Type: application/json\r\n",
                body.as_bytes(),
            )
            .await?
            .status
        }
    };
    Ok((200..300).contains(&status))
}

/// One final text frame carrying `payload`; `masked` (as a client must) with a mask of zeros,
/// which is valid and leaves the payload as it is.
pub fn text_frame(payload: &[u8], masked: bool) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(0x81);
    match payload.len() {
        n if n < 126 => f.push(mask_bit | n as u8),
        n if n <= 0xFFFF => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        f.extend_from_slice(&[0, 0, 0, 0]);
    }
    f.extend_from_slice(payload);
    f
}

/// A client WebSocket: handshake, masked writes, unmasked frame reads.
pub struct WsClient {
    pub stream: Stream,
    buf: Vec<u8>,
    start: usize,
}

impl WsClient {
    pub async fn connect(source: IpAddr, server: SocketAddr, path: &str) -> io::Result<WsClient> {
        let mut stream = connect_from(source, server, true).await?;
        let host = host_of(server, true);
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.send(req.as_bytes()).await?;
        let mut buf = Vec::with_capacity(4096);
        let (status, _, rest) = read_head(&mut stream, &mut buf).await?;
        if status != 101 {
            return Err(io::Error::other(format!("upgrade refused: HTTP {status}")));
        }
        buf.drain(..rest);
        Ok(WsClient {
            stream,
            buf,
            start: 0,
        })
    }

    /// Sends a masked text frame (mask of zeros: valid, and free).
    pub async fn send_text(&mut self, text: &[u8]) -> io::Result<()> {
        self.stream.send(&text_frame(text, true)).await
    }

    /// Reads the next data frame's payload; `Ok(None)` on a close frame.
    /// Ping frames are skipped (the servers under test do not ping).
    pub async fn next_frame(&mut self) -> io::Result<Option<(usize, usize)>> {
        loop {
            let avail = &self.buf[self.start..];
            if avail.len() >= 2 {
                let op = avail[0] & 0x0F;
                let l7 = (avail[1] & 0x7F) as usize;
                let (len, hl) = match l7 {
                    126 if avail.len() >= 4 => {
                        (u16::from_be_bytes([avail[2], avail[3]]) as usize, 4)
                    }
                    127 if avail.len() >= 10 => {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&avail[2..10]);
                        (u64::from_be_bytes(b) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (n, 2),
                };
                if len != usize::MAX && avail.len() >= hl + len {
                    let s = self.start + hl;
                    self.start += hl + len;
                    if op == 0x8 {
                        return Ok(None);
                    }
                    if op == 0x1 || op == 0x2 {
                        return Ok(Some((s, s + len)));
                    }
                    continue;
                }
            }
            // Compact, then read more.
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            // Read into spare capacity: no zeroing of a fresh buffer per read.
            self.buf.reserve(16 * 1024);
            let n = self.stream.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    pub fn slice(&self, range: (usize, usize)) -> &[u8] {
        &self.buf[range.0..range.1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_matches_a_slice_search() {
        let hay = b"aab\"status\":200,\"pgseq\":7,\"pgts\":9 pgseq";
        for needle in [
            &b"pgseq"[..],
            b"\"status\":",
            b"a",
            b"ab",
            b"9 p",
            b"zz",
            b"pgseqq",
        ] {
            let naive = hay.windows(needle.len()).position(|w| w == needle);
            assert_eq!(
                find(hay, needle),
                naive,
                "{:?}",
                String::from_utf8_lossy(needle)
            );
        }
        assert_eq!(find(b"", b"x"), None);
    }

    #[test]
    fn lp_status_reads_the_answer_status_wherever_it_is() {
        assert_eq!(
            lp_status(br#"{"status":200,"token":"lp1","messages":[]}"#),
            Some(200)
        );
        assert_eq!(lp_status(br#"{"token":"lp1","status":410}"#), Some(410));
        assert_eq!(lp_status(br#"{"token":"lp1"}"#), None);
        assert_eq!(
            lp_token(br#"{"status":200,"token":"lp1","messages":[]}"#),
            Some(&b"lp1"[..])
        );
        assert_eq!(lp_token(br#"{"status":500}"#), None);
        let mut seen = Vec::new();
        scan_messages(
            br#"{"status":200,"messages":["{\"pgseq\":3,\"pgts\":11}","{\"pgseq\":4,\"pgts\":12}"]}"#,
            |s, t| seen.push((s, t)),
        );
        assert_eq!(seen, [(3, 11), (4, 12)]);
    }

    #[test]
    fn header_lines_split_what_the_subscribers_send() {
        let got: Vec<_> = header_lines(
            "If-Modified-Since: Mon, 07 Dec 2026 16:00:00 GMT\r\nIf-None-Match: 0\r\n",
        )
        .map(Result::unwrap)
        .collect();
        assert_eq!(
            got,
            [
                ("If-Modified-Since", "Mon, 07 Dec 2026 16:00:00 GMT"),
                ("If-None-Match", "0")
            ]
        );
        assert_eq!(header_lines("").count(), 0);
        let one: Vec<_> = header_lines("Content-Type: application/x-ndjson\r\n")
            .map(Result::unwrap)
            .collect();
        assert_eq!(one, [("Content-Type", "application/x-ndjson")]);
        assert!(header_lines("no colon\r\n").next().unwrap().is_err());
        assert!(header_lines(": empty name\r\n").next().unwrap().is_err());
    }
}
