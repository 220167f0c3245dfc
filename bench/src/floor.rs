//! `pushgate-bench floor`: the least work any server can do for a WebSocket fanout, as a
//! reference point for the figures of real servers (it is not a product).
//!
//! It speaks what the `nchan` adapter speaks (raw WebSocket at `/sub/<topic>`, `POST /pub/<topic>`,
//! `GET /pub/<topic>` for the subscriber count) and nothing else: no protocol, no history, no
//! event loop. A published message is framed once and written to every subscriber of its topic by
//! one blocking `write` each, in a tight loop on the publisher's thread. What such a run costs per
//! delivery is what the kernel charges for one small loopback send (including the receiver's TCP
//! work and wake-up, which loopback runs in the sender's context): the floor under any server's
//! "CPU per delivery" and under its fanout latency on one core.

use base64::Engine;
use sha1::{Digest, Sha1};
use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

type Topics = Arc<Mutex<HashMap<String, Vec<TcpStream>>>>;

#[derive(Debug, Clone, clap::Args)]
pub struct FloorArgs {
    /// Address to listen on.
    #[arg(long)]
    pub listen: SocketAddr,
}

pub fn run(a: FloorArgs) -> ! {
    let listener = match bind(a.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("floor: cannot listen on {}: {e}", a.listen);
            std::process::exit(1);
        }
    };
    let topics: Topics = Arc::default();
    loop {
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut reader = BufReader::new(stream);
        let Ok(head) = read_head(&mut reader) else {
            continue;
        };
        if head.method == "GET" && head.upgrade && head.path.starts_with("/sub/") {
            // Clients send nothing after the handshake, so the reader holds no bytes to keep.
            let mut stream = reader.into_inner();
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                accept_key(&head.key)
            );
            if stream.write_all(answer.as_bytes()).is_ok() {
                let topic = head.path["/sub/".len()..].to_string();
                topics
                    .lock()
                    .unwrap()
                    .entry(topic)
                    .or_default()
                    .push(stream);
            }
        } else {
            // The publisher (or a readiness probe): its own thread, keep-alive.
            let topics = topics.clone();
            std::thread::spawn(move || {
                let _ = serve_http(reader, head, &topics);
                // Stay: the bench reads CPU time from live threads only (/proc/PID/task/*).
                loop {
                    std::thread::park();
                }
            });
        }
    }
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

struct Head {
    method: String,
    path: String,
    upgrade: bool,
    key: String,
    content_length: usize,
}

fn read_head(r: &mut BufReader<TcpStream>) -> io::Result<Head> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut head = Head {
        method,
        path,
        upgrade: false,
        key: String::new(),
        content_length: 0,
    };
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            return Ok(head);
        }
        let Some((name, value)) = l.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "upgrade" => head.upgrade = value.eq_ignore_ascii_case("websocket"),
            "sec-websocket-key" => head.key = value.to_string(),
            "content-length" => head.content_length = value.parse().unwrap_or(0),
            _ => {}
        }
    }
}

fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

fn serve_http(mut r: BufReader<TcpStream>, first: Head, topics: &Topics) -> io::Result<()> {
    let mut head = first;
    loop {
        let mut body = vec![0; head.content_length];
        r.read_exact(&mut body)?;
        let topic = head.path.strip_prefix("/pub/").unwrap_or("");
        match head.method.as_str() {
            "POST" if !topic.is_empty() => {
                r.get_mut()
                    .write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")?;
                let frame = crate::client::text_frame(&body, false);
                let mut all = topics.lock().unwrap();
                if let Some(subs) = all.get_mut(topic) {
                    // A subscriber whose write fails is gone.
                    subs.retain(|mut s| s.write_all(&frame).is_ok());
                }
            }
            "GET" if !topic.is_empty() => {
                let n = topics.lock().unwrap().get(topic).map_or(0, Vec::len);
                let json = format!("{{\"subscribers\":{n}}}");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}",
                    json.len()
                );
                r.get_mut().write_all(answer.as_bytes())?;
            }
            _ => {
                r.get_mut()
                    .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
            }
        }
        head = read_head(&mut r)?;
    }
}
