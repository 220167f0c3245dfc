//! pushgate's own TLS edge (`tls.listen`, src/tls.rs) on a certificate from files
//! (`tls.cert_file`, `tls.key_file`, src/server_cert.rs): served over HTTPS and WebSocket,
//! reloaded when the files change, kept when a renewal is bad.
//!
//! The server runs in this process (`support::start_with`) on a free port; the clients verify
//! against a throwaway CA made here (`support::TestCa`).

mod support;

use futures_util::{SinkExt, StreamExt};
use rustls_acme::futures_rustls::pki_types::pem::PemObject;
use rustls_acme::futures_rustls::pki_types::{CertificateDer, ServerName};
use rustls_acme::rustls::{ClientConfig, RootCertStore};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{TempDir, TestCa};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// The name the edge's certificate is for.
const NAME: &str = "socket.pushgate.test";
/// Long enough for a reload: the files are checked every 2 s and loaded once they held still
/// on two checks (src/tls.rs, `CERT_FILES_CHECK_INTERVAL`), with slack for a loaded machine.
const RELOAD: Duration = Duration::from_secs(15);

/// Writes `ca`'s leaf certificate and key as `fullchain.pem` and `privkey.pem` in `dir`,
/// atomically (a temporary file, then a rename), as certbot's links move at once.
fn write_pair(dir: &Path, ca: &TestCa) {
    for (name, text) in [
        ("fullchain.pem", &ca.cert_pem),
        ("privkey.pem", &ca.key_pem),
    ] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

/// A server with `tls.listen` on a free port serving the files in `dir`; `adjust` changes the
/// configuration further. Started again on a fresh port when the one picked was taken.
async fn start_edge(
    dir: &Path,
    adjust: impl Fn(&mut pushgate::Config),
) -> (support::TestServer, SocketAddr) {
    for _ in 0..support::ports::ATTEMPTS {
        let https: SocketAddr = format!("127.0.0.1:{}", support::free_port())
            .parse()
            .unwrap();
        let mut c = support::test_config();
        c.tls.listen = https.to_string();
        c.tls.cert_file = dir.join("fullchain.pem").display().to_string();
        c.tls.key_file = dir.join("privkey.pem").display().to_string();
        adjust(&mut c);
        let server = support::start_with(c).await;
        // Listening once the plain listener answers (the edge is bound before it serves); a
        // start that lost its TLS port has ended by then.
        let end = Instant::now() + support::DEADLINE;
        loop {
            if server.handle.is_finished() {
                break;
            }
            if tokio::net::TcpStream::connect(https).await.is_ok() {
                return (server, https);
            }
            assert!(Instant::now() < end, "the edge does not listen on {https}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!("the edge's port {https} was taken; trying a fresh one");
    }
    panic!("the edge lost its port on every attempt");
}

fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls_acme::rustls::crypto::ring::default_provider());
    let mut c = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to `addr` for `name` (SNI), verified against `ca_pem`, over `tcp`.
async fn tls_over(
    tcp: tokio::net::TcpStream,
    name: &str,
    ca_pem: &str,
    alpn: &[&[u8]],
) -> std::io::Result<Tls> {
    let connector = tokio_rustls::TlsConnector::from(client_config(ca_pem, alpn));
    let server_name = ServerName::try_from(name.to_string()).unwrap();
    tokio::time::timeout(support::DEADLINE, connector.connect(server_name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))?
}

async fn tls_connect(addr: SocketAddr, name: &str, ca_pem: &str) -> std::io::Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tls_over(tcp, name, ca_pem, &[b"http/1.1"]).await
}

/// `GET path` over HTTPS (HTTP/1.1, `Connection: close`) on an open TLS stream: the status and
/// the body.
async fn https_get(mut tls: Tls, host: &str, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(support::DEADLINE, tls.read_to_end(&mut buf))
        .await
        .expect("an answer in time");
    // nginx may close without close_notify after `Connection: close`.
    if let Err(e) = read {
        assert!(
            e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty(),
            "{e}"
        );
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    (status, body)
}

type Wss = tokio_tungstenite::WebSocketStream<Tls>;

async fn wss(tls: Tls, host: &str) -> Result<Wss, tokio_tungstenite::tungstenite::Error> {
    let url = format!("wss://{host}/socket/websocket?vsn=2.0.0");
    tokio_tungstenite::client_async(url, tls)
        .await
        .map(|(ws, _)| ws)
}

async fn next_text(ws: &mut Wss) -> serde_json::Value {
    loop {
        let m = tokio::time::timeout(support::DEADLINE, ws.next())
            .await
            .expect("no frame in time")
            .expect("stream ended")
            .expect("websocket error");
        if let Message::Text(t) = m {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

/// Joins `topic`, then sees a message published on the plain listener `api` arrive.
async fn join_and_receive(ws: &mut Wss, api: SocketAddr, topic: &str) {
    let join = format!(r#"["1","1","{topic}","phx_join",{{}}]"#);
    ws.send(Message::text(join)).await.unwrap();
    let reply = next_text(ws).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    support::publish(api, topic, "news", r#"{"n":1}"#).await;
    let push = next_text(ws).await;
    assert_eq!(push[2], topic, "{push}");
    assert_eq!(push[3], "news", "{push}");
    assert_eq!(push[4]["n"], 1, "{push}");
}

/// Polls `f` every 50 ms until it gives `Some`, or fails with `what`.
async fn poll<T, Fut: std::future::Future<Output = Option<T>>>(
    within: Duration,
    mut f: impl FnMut() -> Fut,
    what: &str,
) -> T {
    let end = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metric(addr: SocketAddr, sample: &str) -> f64 {
    support::metric(addr, sample)
        .await
        .unwrap_or_else(|| panic!("no sample {sample} in /metrics"))
}

/// The edge serves the certificate from files over HTTPS and WebSocket; a renewal (a new
/// certificate from another CA) is served once loaded; a bad renewal (a key that does not go
/// with the certificate, then garbage) is counted and the renewed certificate stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_are_served_renewed_and_a_bad_renewal_keeps_the_old_one() {
    let tmp = TempDir::new("edge", "files");
    let first = TestCa::new(&[NAME]);
    write_pair(&tmp.0, &first);
    let (server, https) = start_edge(&tmp.0, |_| {}).await;

    let (status, body) = https_get(
        tls_connect(https, NAME, &first.ca_pem).await.unwrap(),
        NAME,
        "/healthz",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut ws = wss(tls_connect(https, NAME, &first.ca_pem).await.unwrap(), NAME)
        .await
        .expect("a WebSocket over TLS");
    join_and_receive(&mut ws, server.addr, "room:files").await;
    let expiry = "pushgate_tls_certificate_expiry_timestamp_seconds";
    assert!(metric(server.addr, expiry).await > 0.0);

    // A renewal: another CA's certificate for the same name.
    let renewed = TestCa::new(&[NAME]);
    write_pair(&tmp.0, &renewed);
    poll(
        RELOAD,
        || async { tls_connect(https, NAME, &renewed.ca_pem).await.ok() },
        "the renewed certificate to be served",
    )
    .await;
    assert!(
        tls_connect(https, NAME, &first.ca_pem).await.is_err(),
        "the first certificate is still served"
    );
    let ok = r#"pushgate_tls_certificate_reloads_total{result="ok"}"#;
    let error = r#"pushgate_tls_certificate_reloads_total{result="error"}"#;
    assert_eq!(metric(server.addr, ok).await, 1.0);
    // The WebSocket opened before the renewal goes on.
    ws.send(Message::text(r#"[null,"2","phoenix","heartbeat",{}]"#))
        .await
        .unwrap();
    assert_eq!(next_text(&mut ws).await[1], "2");

    // A bad renewal: a key that is not the certificate's; then garbage in the chain.
    let stranger = TestCa::new(&[NAME]);
    std::fs::write(tmp.path("privkey.pem"), &stranger.key_pem).unwrap();
    let addr = server.addr;
    poll(
        RELOAD,
        || async move { (metric(addr, error).await >= 1.0).then_some(()) },
        "the bad renewal to be counted",
    )
    .await;
    std::fs::write(tmp.path("fullchain.pem"), "not a certificate").unwrap();
    poll(
        RELOAD,
        || async move { (metric(addr, error).await >= 2.0).then_some(()) },
        "the garbage to be counted",
    )
    .await;
    let (status, _) = https_get(
        tls_connect(https, NAME, &renewed.ca_pem)
            .await
            .expect("the renewed certificate stays after bad renewals"),
        NAME,
        "/healthz",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(metric(server.addr, ok).await, 1.0);

    // Good files again: loaded.
    write_pair(&tmp.0, &stranger);
    poll(
        RELOAD,
        || async { tls_connect(https, NAME, &stranger.ca_pem).await.ok() },
        "good files after bad ones to be served",
    )
    .await;
    assert_eq!(metric(server.addr, ok).await, 2.0);
}

/// The real binary refuses to start (and `check-config` refuses the configuration) when the
/// files do not load, naming the key and the problem.
#[test]
fn bad_certificate_files_at_start_are_a_config_error() {
    let tmp = TempDir::new("edge", "bad-files");
    let good = TestCa::new(&[NAME]);
    let other = TestCa::new(&[NAME]);
    std::fs::write(tmp.path("fullchain.pem"), &good.cert_pem).unwrap();
    std::fs::write(tmp.path("privkey.pem"), &other.key_pem).unwrap();
    let run = |args: &[&str], chain: &Path| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pushgate"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("PUSHGATE_") || k == "PORT" {
                cmd.env_remove(k);
            }
        }
        let out = cmd
            .args(args)
            .env(
                "PUSHGATE_LISTEN",
                format!("127.0.0.1:{}", support::free_port()),
            )
            .env(
                "PUSHGATE_TLS_LISTEN",
                format!("127.0.0.1:{}", support::free_port()),
            )
            .env("PUSHGATE_TLS_CERT_FILE", chain)
            .env("PUSHGATE_TLS_KEY_FILE", tmp.path("privkey.pem"))
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for args in [&["check-config"][..], &["serve"]] {
        let (code, stderr) = run(args, &tmp.path("fullchain.pem"));
        assert_ne!(code, Some(0), "{args:?}: {stderr}");
        assert!(
            stderr.contains("tls.cert_file") && stderr.contains("does not go with"),
            "{args:?}: {stderr}"
        );
        let (code, stderr) = run(args, &tmp.path("missing.pem"));
        assert_ne!(code, Some(0), "{args:?}: {stderr}");
        assert!(
            stderr.contains("tls.cert_file") && stderr.contains("cannot read"),
            "{args:?}: {stderr}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// PROXY protocol (`tls.proxy_protocol`)
// ---------------------------------------------------------------------------------------------

/// A version 1 header naming `client` (as nginx's `stream` module writes it).
fn v1_header(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        client.ip(),
        server.ip(),
        client.port(),
        server.port()
    )
    .into_bytes()
}

/// A version 2 header, `PROXY` naming `client` or `LOCAL`.
fn v2_header(client: SocketAddr, server: SocketAddr, local: bool) -> Vec<u8> {
    let command = if local {
        ppp::v2::Command::Local
    } else {
        ppp::v2::Command::Proxy
    };
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | command,
        ppp::v2::Protocol::Stream,
        (client, server),
    )
    .build()
    .unwrap()
}

/// A TCP connection to `addr` that sends `header` first (in the same segment as nothing else:
/// the TLS handshake follows in its own writes).
async fn connect_with_header(addr: SocketAddr, header: &[u8]) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(header).await.unwrap();
    tcp
}

/// A WebSocket over TLS behind `header`: its join reply, or the HTTP status that refused it.
async fn websocket_behind(https: SocketAddr, header: &[u8], ca_pem: &str) -> Result<Wss, u16> {
    let tcp = connect_with_header(https, header).await;
    let tls = tls_over(tcp, NAME, ca_pem, &[b"http/1.1"])
        .await
        .expect("TLS behind a PROXY header");
    joined_over(tls, "room:proxy").await
}

/// A Phoenix WebSocket over `tls` (SNI [`NAME`]) joined to `topic`, or the HTTP status that
/// refused the upgrade.
async fn joined_over(tls: Tls, topic: &str) -> Result<Wss, u16> {
    match wss(tls, NAME).await {
        Ok(mut ws) => {
            let join = format!(r#"["1","1","{topic}","phx_join",{{}}]"#);
            ws.send(Message::text(join)).await.unwrap();
            let reply = next_text(&mut ws).await;
            assert_eq!(reply[4]["status"], "ok", "{reply}");
            Ok(ws)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("websocket to {topic}: {e}"),
    }
}

/// The client a PROXY header names (v1 or v2) is the one the per-address limit counts, not the
/// socket's address (127.0.0.1, the test's own); a `LOCAL` header counts the socket's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_header_names_the_client_the_limits_count() {
    let tmp = TempDir::new("edge", "proxy-limits");
    let ca = TestCa::new(&[NAME]);
    write_pair(&tmp.0, &ca);
    let (server, https) = start_edge(&tmp.0, |c| {
        c.tls.proxy_protocol = true;
        c.limits.max_connections_per_address = 1;
    })
    .await;
    let nine: SocketAddr = "127.0.0.9:40000".parse().unwrap();
    let ten: SocketAddr = "127.0.0.10:40001".parse().unwrap();
    let socket: SocketAddr = "127.0.0.1:40002".parse().unwrap();

    // 127.0.0.9 by version 1 holds its one connection; by version 2 it gets no second.
    let first = websocket_behind(https, &v1_header(nine, https), &ca.ca_pem)
        .await
        .expect("127.0.0.9's first WebSocket");
    let second = websocket_behind(https, &v2_header(nine, https, false), &ca.ca_pem).await;
    assert_eq!(second.err(), Some(429), "127.0.0.9's second WebSocket");
    let per_address = r#"pushgate_refusals_total{cause="per_address"}"#;
    assert_eq!(metric(server.addr, per_address).await, 1.0);
    // 127.0.0.10, from the same socket address, is another client (version 2).
    let other = websocket_behind(https, &v2_header(ten, https, false), &ca.ca_pem)
        .await
        .expect("127.0.0.10's WebSocket");
    // LOCAL: the socket's own address (127.0.0.1) is the client, with its own connection...
    let local = websocket_behind(https, &v2_header(nine, https, true), &ca.ca_pem)
        .await
        .expect("a WebSocket behind LOCAL");
    // ... which a header naming 127.0.0.1 then finds taken.
    let taken = websocket_behind(https, &v1_header(socket, https), &ca.ca_pem).await;
    assert_eq!(
        taken.err(),
        Some(429),
        "127.0.0.1 after the LOCAL connection"
    );
    assert_eq!(metric(server.addr, per_address).await, 2.0);
    drop((first, other, local));
}

/// Reads `stream` until the server ends it; the time it took. Fails if it is still open
/// after `within`.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> Duration {
    let start = Instant::now();
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout_at((start + within).into(), stream.read(&mut chunk)).await {
            Err(_) => panic!("still open after {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

/// A connection without a valid PROXY header is closed: none (TLS at once), garbage, and a
/// header that never completes (at the handshake deadline); each counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_valid_proxy_header_are_closed() {
    let tmp = TempDir::new("edge", "proxy-refusals");
    let ca = TestCa::new(&[NAME]);
    write_pair(&tmp.0, &ca);
    let (server, https) = start_edge(&tmp.0, |c| {
        c.tls.proxy_protocol = true;
        c.tls.handshake_timeout_ms = 1000;
    })
    .await;
    let refused = r#"pushgate_refusals_total{cause="proxy_protocol"}"#;
    let timeouts = r#"pushgate_refusals_total{cause="timeout"}"#;

    // No header: the ClientHello is not one, and the handshake fails.
    assert!(tls_connect(https, NAME, &ca.ca_pem).await.is_err());
    // Garbage: closed at once.
    let mut garbage = connect_with_header(https, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    closed_within(&mut garbage, Duration::from_millis(900)).await;
    let addr = server.addr;
    poll(
        support::DEADLINE,
        || async move { (metric(addr, refused).await == 2.0).then_some(()) },
        "two refusals for a missing and a garbage header",
    )
    .await;

    // A header that stops half-way: closed at the deadline, not before.
    let mut slow = connect_with_header(https, b"PROXY TCP4 127.0.0.9 127.0").await;
    let took = closed_within(&mut slow, Duration::from_secs(3)).await;
    assert!(took >= Duration::from_millis(800), "closed after {took:?}");
    assert_eq!(metric(server.addr, timeouts).await, 1.0);
    assert_eq!(metric(server.addr, refused).await, 2.0);

    // A good header still works.
    let nine: SocketAddr = "127.0.0.9:40000".parse().unwrap();
    let tcp = connect_with_header(https, &v1_header(nine, https)).await;
    let tls = tls_over(tcp, NAME, &ca.ca_pem, &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(https_get(tls, NAME, "/healthz").await.0, 200);
}

// ---------------------------------------------------------------------------------------------
// The SNI mode: nginx's stream server in front (nginx/pushgate-sni.conf)
// ---------------------------------------------------------------------------------------------

const NGINX: &str = "/usr/sbin/nginx";
/// The name the site answers to in the SNI test (the socket's is [`NAME`]).
const SITE_NAME: &str = "www.pushgate.test";

/// `template` (a file in nginx/) rendered by nginx/render.sh with `vars`.
fn render(template: &str, vars: &[String]) -> Vec<u8> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read(repo.join("nginx").join(template)).unwrap();
    let mut render = std::process::Command::new(repo.join("nginx/render.sh"))
        .args(vars)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nginx/render.sh");
    std::io::Write::write_all(&mut render.stdin.take().unwrap(), &text).unwrap();
    let out = render.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "render.sh {template}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// nginx in the foreground with a private prefix; stopped with SIGTERM on drop (SIGKILL
/// would orphan its worker).
struct Nginx {
    child: std::process::Child,
    prefix: PathBuf,
}

impl Nginx {
    fn error_log(&self) -> String {
        std::fs::read_to_string(self.prefix.join("logs/error.log")).unwrap_or_default()
    }
    fn access_log(&self) -> String {
        std::fs::read_to_string(self.prefix.join("logs/access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The SNI mode as shipped: nginx/pushgate-sni.conf in nginx's main context on a public port
/// (IPv4 and IPv6), routing [`NAME`] to pushgate's edge at `edge` and every other name to the
/// site, nginx/pushgate.conf rendered with its HTTPS listeners on loopback with
/// `proxy_protocol`. Both serve the certificate in `tls_dir`. Returns nginx and its public
/// port, once it listens; started again on fresh ports when one was taken.
fn start_sni_nginx(
    prefix: &Path,
    tls_dir: &Path,
    edge: SocketAddr,
    pushgate: SocketAddr,
) -> (Nginx, u16) {
    for d in ["conf", "logs", "tmp", "static"] {
        std::fs::create_dir_all(prefix.join(d)).unwrap();
    }
    // nginx's workers run as nobody when the tests run as root.
    for d in [prefix, &prefix.join("static"), tls_dir] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::write(prefix.join("static/hello.txt"), "hello from the site\n").unwrap();
    support::ports::retry_taken_ports("nginx (SNI mode)", |_| {
        let (public, site, http) = (
            support::free_port_v4_v6(),
            support::free_port_v4_v6(),
            support::free_port_v4_v6(),
        );
        let stream = render(
            "pushgate-sni.conf",
            &[
                format!("socket_server_name={NAME}"),
                format!("listen_https=127.0.0.1:{public}"),
                format!("listen_https_v6=[::1]:{public}"),
                format!("pushgate_tls_upstream={edge}"),
                format!("site_upstream=127.0.0.1:{site}"),
            ],
        );
        let site_conf = render(
            "pushgate.conf",
            &[
                format!("server_name={SITE_NAME}"),
                format!("listen_http=127.0.0.1:{http}"),
                format!("listen_http_v6=[::1]:{http}"),
                format!("listen_https=127.0.0.1:{site} proxy_protocol"),
                format!("listen_https_v6=[::1]:{site} proxy_protocol"),
                format!("tls_dir={}", tls_dir.display()),
                format!("static_root={}", prefix.join("static").display()),
                format!("pushgate_upstream={pushgate}"),
                format!("app_upstream=127.0.0.1:{}", support::free_port()),
            ],
        );
        std::fs::write(prefix.join("conf/pushgate-sni.conf"), stream).unwrap();
        std::fs::write(prefix.join("conf/pushgate.conf"), site_conf).unwrap();
        let p = prefix.display();
        // As Debian's nginx.conf: modules loaded, then (main context) the stream server, as
        // /etc/nginx/modules-enabled/*.conf would include it; the site inside http {}.
        let main = support::nginx_main_conf(
            prefix,
            &format!(
                "load_module {}/ngx_stream_module.so;\ninclude {p}/conf/pushgate-sni.conf;",
                support::NGINX_MODULES
            ),
        );
        let conf = prefix.join("conf/nginx.conf");
        std::fs::write(&conf, main).unwrap();
        let _ = std::fs::remove_file(prefix.join("logs/error.log"));
        let child = std::process::Command::new(NGINX)
            .arg("-p")
            .arg(prefix)
            .arg("-e")
            .arg(prefix.join("logs/error.log"))
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("cannot start nginx");
        let mut nginx = Nginx {
            child,
            prefix: prefix.to_path_buf(),
        };
        let started = support::ports::wait_listening(
            &mut nginx.child,
            &[public, site, http],
            support::DEADLINE,
            "nginx",
        );
        if let Err(taken) = started {
            let log = nginx.error_log();
            assert!(
                support::ports::says_port_taken(&log),
                "nginx exited:\n{log}"
            );
            return Err(taken);
        }
        // Its master binds every listen line (IPv6 too) before it starts a worker.
        let end = Instant::now() + support::DEADLINE;
        while !nginx.error_log().contains("start worker process") {
            assert!(
                Instant::now() < end,
                "nginx started no worker:\n{}",
                nginx.error_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((nginx, public))
    })
}

/// A TCP connection to `addr` from the source address `from` (any of 127/8 is on `lo`).
async fn connect_from(from: &str, addr: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// A Phoenix WebSocket through nginx's stream server from `from`, with SNI [`NAME`]: joined
/// to `room:sni`, or the HTTP status that refused it.
async fn socket_through_nginx(from: &str, public: SocketAddr, ca_pem: &str) -> Result<Wss, u16> {
    let tls = tls_over(
        connect_from(from, public).await,
        NAME,
        ca_pem,
        &[b"http/1.1"],
    )
    .await
    .expect("TLS to the socket hostname through nginx");
    joined_over(tls, "room:sni").await
}

/// The SNI mode end to end: through nginx's stream server, the socket hostname reaches
/// pushgate's edge (certificate from files, PROXY protocol) and a WebSocket joins and receives
/// a publish, while the site's name gets the site (a static file); both see the client's own
/// address (127.0.0.7), not nginx's: pushgate's per-address limit counts 127.0.0.7 (a second
/// socket from it is refused, one from 127.0.0.8 is not), and the site's access log names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_mode_routes_the_socket_name_to_the_edge_and_the_rest_to_the_site() {
    let tmp = TempDir::new("edge", "sni");
    let tls_dir = tmp.path("tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    let ca = TestCa::new(&[NAME, SITE_NAME]);
    write_pair(&tls_dir, &ca);
    {
        // nginx's workers (nobody) read the key.
        use std::os::unix::fs::PermissionsExt;
        let key = tls_dir.join("privkey.pem");
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let (server, edge) = start_edge(&tls_dir, |c| {
        c.tls.proxy_protocol = true;
        c.limits.max_connections_per_address = 1;
    })
    .await;
    let (nginx, public) = start_sni_nginx(&tmp.path("nginx"), &tls_dir, edge, server.addr);
    let public: SocketAddr = format!("127.0.0.1:{public}").parse().unwrap();

    // The socket hostname: pushgate's edge, a join and a publish.
    let mut ws = socket_through_nginx("127.0.0.7", public, &ca.ca_pem)
        .await
        .expect("a WebSocket through nginx's stream server");
    support::publish(server.addr, "room:sni", "news", r#"{"n":7}"#).await;
    let push = next_text(&mut ws).await;
    assert_eq!(
        (push[2].as_str(), push[4]["n"].as_i64()),
        (Some("room:sni"), Some(7)),
        "{push}"
    );
    // pushgate counts 127.0.0.7, not nginx's 127.0.0.1.
    let second = socket_through_nginx("127.0.0.7", public, &ca.ca_pem).await;
    assert_eq!(second.err(), Some(429), "127.0.0.7's second WebSocket");
    let other = socket_through_nginx("127.0.0.8", public, &ca.ca_pem)
        .await
        .expect("127.0.0.8's WebSocket");

    // The site's name: the site, over HTTP/1.1 and HTTP/2, its log naming the client.
    let tls = tls_over(
        connect_from("127.0.0.7", public).await,
        SITE_NAME,
        &ca.ca_pem,
        &[b"http/1.1"],
    )
    .await
    .expect("TLS to the site through nginx");
    let (status, body) = https_get(tls, SITE_NAME, "/hello.txt").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "hello from the site\n"),
        "{}",
        nginx.error_log()
    );
    let tls = tls_over(
        connect_from("127.0.0.7", public).await,
        SITE_NAME,
        &ca.ca_pem,
        &[b"h2"],
    )
    .await
    .unwrap();
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "the site speaks HTTP/2"
    );
    let hello = nginx
        .access_log()
        .lines()
        .filter(|l| l.contains("GET /hello.txt"))
        .map(str::to_string)
        .collect::<Vec<_>>();
    assert!(
        hello.len() == 1 && hello[0].starts_with("127.0.0.7 "),
        "the site's access log: {hello:?}"
    );
    drop((ws, other));
}
