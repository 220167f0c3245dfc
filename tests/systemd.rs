//! The real binary under the two systemd protocols it speaks, driven the way systemd drives it:
//!
//! - sd_notify: the test binds its own `NOTIFY_SOCKET` (a Unix datagram socket) and reads
//!   `READY=1`, `WATCHDOG=1` and `STOPPING=1` from it;
//! - socket activation: the test binds the listening socket itself and hands it to pushgate as
//!   fd 3 with `LISTEN_FDS=1` and `LISTEN_PID` set to the child's own pid (a `sh` wrapper sets it
//!   before `exec`, as systemd does after `fork`); keeping its copy of the socket across a
//!   restart, as `pushgate.socket` does, shows that no connection is refused meanwhile. The
//!   edge mode's sockets (`tls.listen`) may be passed the same way, beside the plain one.
//!
//! Environment variables are set on the child only; the child gets none of the test process's
//! `PUSHGATE_*`, `NOTIFY_SOCKET`, `LISTEN_*` or `WATCHDOG_*` variables.

mod support;

use command_fds::{CommandFdExt, FdMapping};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long the binary may take to start, answer, or stop.
const DEADLINE: Duration = Duration::from_secs(10);

/// `pushgate serve` with a clean environment and short drain settings.
fn pushgate_serve(extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pushgate"));
    clean_env(&mut c);
    c.arg("serve").args(extra);
    c
}

fn clean_env(c: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("PUSHGATE_")
            || k.starts_with("LISTEN_")
            || k.starts_with("WATCHDOG_")
            || k == "NOTIFY_SOCKET"
        {
            c.env_remove(k);
        }
    }
    c.env("PUSHGATE_PUBLISH_TOKEN", support::TOKEN)
        .env("PUSHGATE_SHUTDOWN_DRAIN_MS", "50")
        .env("PUSHGATE_SHUTDOWN_GRACE_MS", "3000")
        .env("PUSHGATE_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
}

/// `pushgate serve --listen 127.0.0.1:0` started the way systemd starts a socket-activated
/// service: `listener` as fd 3, `LISTEN_FDS=1`, `LISTEN_PID` = the pid that runs pushgate.
fn socket_activated(listener: &TcpListener) -> Proc {
    socket_activated_with(&[listener], &[])
}

/// The same with `listeners` as fds 3, 4, … and `env` set.
fn socket_activated_with(listeners: &[&TcpListener], env: &[(&str, String)]) -> Proc {
    let mut c = Command::new("sh");
    clean_env(&mut c);
    c.args([
        "-c",
        r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#,
        env!("CARGO_BIN_EXE_pushgate"),
        "serve",
        "--listen",
        "127.0.0.1:0",
    ])
    .env("LISTEN_FDS", listeners.len().to_string())
    .env(
        "LISTEN_FDNAMES",
        vec!["pushgate.socket"; listeners.len()].join(":"),
    )
    .envs(env.iter().map(|(k, v)| (k, v)));
    let mappings = listeners
        .iter()
        .enumerate()
        .map(|(i, l)| FdMapping {
            parent_fd: OwnedFd::from(l.try_clone().expect("dup the listener")),
            child_fd: 3 + i as i32,
        })
        .collect();
    c.fd_mappings(mappings).expect("map fds 3 on");
    Proc::spawn(c)
}

/// A running child, its stderr lines (read by a thread), killed on drop.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Proc {
    fn spawn(mut c: Command) -> Proc {
        let mut child = c.spawn().expect("spawn pushgate");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// The first line (from now on) containing `needle`.
    fn wait_line(&mut self, needle: &str) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no log line with {needle:?} ({e}); exit {:?}; log:\n{}",
                    self.child.try_wait().ok().flatten(),
                    self.log.join("\n")
                ),
            }
        }
    }

    /// The address from the first `listening addr=` line.
    fn listening_addr(&mut self) -> SocketAddr {
        let line = self.wait_line("listening addr=");
        let word = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .unwrap_or_else(|| panic!("no addr= in {line:?}"));
        word.trim_matches('"').parse().expect("an address")
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// SIGTERM, then a clean exit (status 0), or a failure showing the log.
    fn stop_cleanly(&mut self) {
        self.sigterm();
        let status = self.wait_exit();
        assert!(
            status.success(),
            "exit {status:?}; log:\n{}",
            self.log.join("\n")
        );
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.log.push(line);
                }
                return status;
            }
            assert!(
                Instant::now() < end,
                "pushgate did not exit; log:\n{}",
                self.log.join("\n")
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A notification socket of the test's own, in a fresh directory (removed on drop).
struct NotifySocket {
    dir: PathBuf,
    path: PathBuf,
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pushgate-notify-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        NotifySocket {
            dir,
            path,
            sock,
            seen: Vec::new(),
        }
    }

    /// The next datagram, before `end`; `None` at `end`.
    fn recv_until(&mut self, end: Instant) -> Option<String> {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        self.sock.set_read_timeout(Some(left)).unwrap();
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                Some(msg)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("recv on the notify socket: {e}"),
        }
    }

    /// The next datagram; panics after the deadline.
    fn recv(&mut self) -> String {
        self.recv_until(Instant::now() + DEADLINE)
            .unwrap_or_else(|| panic!("no notification in time; seen: {:?}", self.seen))
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn lines(msg: &str) -> Vec<&str> {
    msg.lines().collect()
}

/// Sends a `Connection: close` GET on `stream` and returns the status code of the answer.
fn get_status(mut stream: TcpStream, path: &str) -> u16 {
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    read_status(stream)
}

fn read_status(mut stream: TcpStream) -> u16 {
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .expect("read the HTTP answer");
    status_of(&answer)
}

/// The status code of an HTTP/1.1 answer.
fn status_of(answer: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"))
}

#[test]
fn ready_watchdog_and_stopping_are_sent_to_notify_socket() {
    let mut notify = NotifySocket::new();
    let mut c = pushgate_serve(&["--listen", "127.0.0.1:0"]);
    // 100 ms: systemd's WatchdogSec=100ms; pushgate should ping every 50 ms.
    c.env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "100000");
    let mut p = Proc::spawn(c);

    let first = notify.recv();
    assert!(
        lines(&first).contains(&"READY=1"),
        "first notification must be READY=1, got {first:?}"
    );
    assert!(
        first
            .lines()
            .any(|l| l.starts_with("STATUS=listening on 127.0.0.1:")),
        "READY=1 should carry a STATUS line, got {first:?}"
    );
    // READY=1 means connections are served from now on.
    let addr = p.listening_addr();
    assert_eq!(
        get_status(TcpStream::connect(addr).unwrap(), "/readyz"),
        200
    );

    // Pings at half the interval: at least 5 within a second (10 expected).
    let start = Instant::now();
    let mut pings = 0;
    while pings < 5 {
        let msg = notify
            .recv_until(start + Duration::from_secs(1))
            .unwrap_or_else(|| panic!("only {pings} WATCHDOG=1 in 1 s; seen {:?}", notify.seen));
        assert_eq!(msg.trim_end(), "WATCHDOG=1", "unexpected notification");
        pings += 1;
    }

    p.sigterm();
    let stopping = loop {
        let msg = notify.recv();
        if msg.trim_end() != "WATCHDOG=1" {
            break msg;
        }
    };
    assert!(
        lines(&stopping).contains(&"STOPPING=1"),
        "after SIGTERM expected STOPPING=1, got {stopping:?}"
    );
    let status = p.wait_exit();
    assert!(
        status.success(),
        "exit {status:?}; log:\n{}",
        p.log.join("\n")
    );
    assert!(
        !notify.seen.iter().skip(1).any(|m| m.contains("READY=1")),
        "READY=1 sent twice: {:?}",
        notify.seen
    );
}

#[test]
fn no_watchdog_pings_when_the_watchdog_is_for_another_process() {
    let mut notify = NotifySocket::new();
    let mut c = pushgate_serve(&["--listen", "127.0.0.1:0"]);
    // systemd sets WATCHDOG_PID; a value naming another process means "not for you".
    c.env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "20000")
        .env("WATCHDOG_PID", "1");
    let mut p = Proc::spawn(c);
    let first = notify.recv();
    assert!(lines(&first).contains(&"READY=1"), "got {first:?}");
    // Proving an absence: at 10 ms pings, 300 ms would have brought about 30.
    let quiet = notify.recv_until(Instant::now() + Duration::from_millis(300));
    assert_eq!(quiet, None, "pinged a watchdog that is not ours");
    p.sigterm();
    assert!(p.wait_exit().success());
}

#[test]
fn without_notify_socket_nothing_is_sent_and_serving_works() {
    let mut p = Proc::spawn(pushgate_serve(&["--listen", "127.0.0.1:0"]));
    let addr = p.listening_addr();
    assert_eq!(
        get_status(TcpStream::connect(addr).unwrap(), "/healthz"),
        200
    );
    p.sigterm();
    let status = p.wait_exit();
    assert!(status.success(), "log:\n{}", p.log.join("\n"));
    assert!(
        !p.log.iter().any(|l| l.contains("cannot notify systemd")),
        "log:\n{}",
        p.log.join("\n")
    );
}

#[test]
fn serves_the_socket_systemd_passes_and_a_restart_refuses_no_connection() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The socket unit's socket: bound and listening before any pushgate runs.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();

    // A client arriving before the service started waits in the accept queue.
    let mut early = TcpStream::connect(addr).expect("connect to the socket unit's socket");
    write!(
        early,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    early.set_read_timeout(Some(DEADLINE)).unwrap();

    let mut first = socket_activated(&listener);
    first.wait_line("passed by systemd");
    assert_eq!(
        first.listening_addr(),
        addr,
        "must serve the passed socket, not server.listen / --listen"
    );
    assert_eq!(read_status(early), 200, "the queued client was not served");

    // A WebSocket client of the first process is told to reconnect (1012) when it stops.
    rt.block_on(async {
        let mut ws = support::connect(addr).await;
        support::join(&mut ws, "1", "room:restart", "{}").await;
        first.sigterm();
        assert_eq!(support::recv_close(&mut ws).await, 1012);
    });
    let status = first.wait_exit();
    assert!(
        status.success(),
        "exit {status:?}; log:\n{}",
        first.log.join("\n")
    );

    // No process serves the socket now, but it is still listening: a connection made during
    // the restart is accepted by the kernel and answered by the next process.
    let gap = TcpStream::connect(addr).expect("a connection during the restart was refused");
    let mut second = socket_activated(&listener);
    assert_eq!(second.listening_addr(), addr);
    assert_eq!(get_status(gap, "/readyz"), 200);
    rt.block_on(async {
        let mut ws = support::connect(addr).await;
        let reply = support::join(&mut ws, "1", "room:restart", "{}").await;
        assert!(reply["position"].is_string(), "join reply {reply}");
    });
    second.sigterm();
    assert!(second.wait_exit().success());
}

/// A test CA and a certificate for "localhost", written as fullchain.pem and privkey.pem in a
/// directory of the test's own.
fn edge_certificate(name: &str) -> (support::TestCa, support::TempDir) {
    let ca = support::TestCa::new(&["localhost"]);
    let dir = support::TempDir::new("systemd", name);
    std::fs::write(dir.path("fullchain.pem"), &ca.cert_pem).unwrap();
    std::fs::write(dir.path("privkey.pem"), &ca.key_pem).unwrap();
    (ca, dir)
}

fn path_of(dir: &support::TempDir, file: &str) -> String {
    dir.path(file).display().to_string()
}

type TlsClient = rustls_acme::rustls::StreamOwned<rustls_acme::rustls::ClientConnection, TcpStream>;

/// `GET /healthz` over TLS (HTTP/1.1) on `tcp`, verified for "localhost" against `ca_pem`: the
/// status.
fn https_healthz(tcp: TcpStream, ca_pem: &str) -> u16 {
    https_get_healthz(tls_client(tcp, ca_pem))
}

/// A TLS client for "localhost" over `tcp`, trusting `ca_pem` (the handshake runs on first use).
fn tls_client(tcp: TcpStream, ca_pem: &str) -> TlsClient {
    use rustls_acme::rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    use rustls_acme::rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls_acme::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    tcp.set_read_timeout(Some(DEADLINE)).unwrap();
    StreamOwned::new(conn, tcp)
}

/// `GET /healthz` (HTTP/1.1, `Connection: close`) on `tls`: the status.
fn https_get_healthz(mut tls: TlsClient) -> u16 {
    write!(
        tls,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("TLS handshake and request");
    let mut answer = Vec::new();
    // A close without close_notify after `Connection: close` is fine once the answer is in.
    let _ = tls.read_to_end(&mut answer);
    status_of(&answer)
}

#[test]
fn serves_the_edge_socket_systemd_passes_and_a_restart_refuses_no_connection_there() {
    // pushgate.socket in the edge mode: the plain socket, and tls.listen's, both systemd's.
    let plain = TcpListener::bind("127.0.0.1:0").unwrap();
    let edge = TcpListener::bind("127.0.0.1:0").unwrap();
    let edge_addr = edge.local_addr().unwrap();
    let (ca, dir) = edge_certificate("edge");
    let env = [
        ("PUSHGATE_TLS_LISTEN", edge_addr.to_string()),
        ("PUSHGATE_TLS_CERT_FILE", path_of(&dir, "fullchain.pem")),
        ("PUSHGATE_TLS_KEY_FILE", path_of(&dir, "privkey.pem")),
    ];

    let mut first = socket_activated_with(&[&plain, &edge], &env);
    assert_eq!(first.listening_addr(), plain.local_addr().unwrap());
    let line = first.wait_line("the socket passed by systemd");
    assert!(line.contains(&edge_addr.to_string()), "{line}");
    let tcp = TcpStream::connect(edge_addr).unwrap();
    assert_eq!(https_healthz(tcp, &ca.ca_pem), 200);
    first.stop_cleanly();

    // Between the two processes the edge's socket still listens: a client arriving then is
    // queued by the kernel, and the next process does its handshake.
    let gap = TcpStream::connect(edge_addr)
        .expect("a connection to the edge during the restart was refused");
    let mut second = socket_activated_with(&[&plain, &edge], &env);
    assert_eq!(https_healthz(gap, &ca.ca_pem), 200);
    second.wait_line("the socket passed by systemd");
    second.sigterm();
    assert!(second.wait_exit().success());
}

#[test]
fn a_request_arriving_as_the_drain_begins_is_answered_on_both_listeners() {
    // A client that connected just before SIGTERM (its TLS handshake done, or nothing sent on
    // plain HTTP yet) sends its request just after: it must get an answer, not a closed
    // connection. `shutdown.drain_ms` long enough that the request lands inside it.
    let plain = TcpListener::bind("127.0.0.1:0").unwrap();
    let edge = TcpListener::bind("127.0.0.1:0").unwrap();
    let (ca, dir) = edge_certificate("late");
    let env = [
        (
            "PUSHGATE_TLS_LISTEN",
            edge.local_addr().unwrap().to_string(),
        ),
        ("PUSHGATE_TLS_CERT_FILE", path_of(&dir, "fullchain.pem")),
        ("PUSHGATE_TLS_KEY_FILE", path_of(&dir, "privkey.pem")),
        ("PUSHGATE_SHUTDOWN_DRAIN_MS", "3000".to_string()),
    ];
    let mut p = socket_activated_with(&[&plain, &edge], &env);
    p.listening_addr();
    p.wait_line("the socket passed by systemd");

    let mut tls = tls_client(
        TcpStream::connect(edge.local_addr().unwrap()).unwrap(),
        &ca.ca_pem,
    );
    tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
    let quiet = TcpStream::connect(plain.local_addr().unwrap()).unwrap();
    // Accepted before the drain: the server is serving it when SIGTERM arrives.
    let _ = get_status(
        TcpStream::connect(plain.local_addr().unwrap()).unwrap(),
        "/healthz",
    );
    p.sigterm();
    p.wait_line("shutting down");

    assert_eq!(
        get_status(quiet, "/healthz"),
        200,
        "the plain connection was closed"
    );
    assert_eq!(
        https_get_healthz(tls),
        200,
        "the edge connection was closed"
    );
    assert!(p.wait_exit().success());
}

#[test]
fn a_sigterm_as_soon_as_it_listens_is_a_clean_stop() {
    // The handlers are in place before "listening": a SIGTERM at once drains and exits 0, never
    // kills the process by the signal's default action.
    for _ in 0..20 {
        let mut p = Proc::spawn(pushgate_serve(&["--listen", "127.0.0.1:0"]));
        p.wait_line("listening addr=");
        p.stop_cleanly();
    }
}

#[test]
fn listen_fds_for_another_process_are_ignored() {
    // LISTEN_PID names another process: the fds are not ours, server.listen is bound instead.
    let mut c = pushgate_serve(&["--listen", "127.0.0.1:0"]);
    c.env("LISTEN_FDS", "1").env("LISTEN_PID", "1");
    let mut p = Proc::spawn(c);
    let addr = p.listening_addr();
    assert_ne!(addr.port(), 0);
    assert_eq!(
        get_status(TcpStream::connect(addr).unwrap(), "/healthz"),
        200
    );
    assert!(!p.log.iter().any(|l| l.contains("passed by systemd")));
    p.sigterm();
    assert!(p.wait_exit().success());
}

#[test]
fn a_passed_fd_that_is_not_a_tcp_listener_is_a_clear_error() {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut c = Command::new("sh");
    clean_env(&mut c);
    c.args([
        "-c",
        r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#,
        env!("CARGO_BIN_EXE_pushgate"),
        "serve",
    ])
    .env("LISTEN_FDS", "1");
    c.fd_mappings(vec![FdMapping {
        parent_fd: OwnedFd::from(udp),
        child_fd: 3,
    }])
    .unwrap();
    let mut p = Proc::spawn(c);
    let line = p.wait_line("LISTEN_FDS");
    assert!(line.contains("fd 3"), "{line}");
    let status = p.wait_exit();
    assert_eq!(status.code(), Some(1), "log:\n{}", p.log.join("\n"));
}
