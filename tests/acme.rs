//! ACME (`[acme]`, src/acme.rs) against Let's Encrypt's test CA: Debian's `pebble` with
//! `pebble-challtestsrv` answering DNS (every name resolves to 127.0.0.1), on free ports, with a
//! CA and listener certificate made here (the package ships none). Validation is real: Pebble's
//! validator fetches `/.well-known/acme-challenge/<token>` over HTTP, through the shipped nginx
//! site (nginx/pushgate.conf rendered by nginx/render.sh) or straight from pushgate.
//!
//! pushgate is the real binary, so that a restart is a real restart and its logs can be read.
//! Environment variables are set on child processes only. Processes are stopped with SIGTERM
//! when a test ends (nginx orphans its workers on SIGKILL).

mod support;

use rustls_acme::futures_rustls::pki_types::pem::PemObject;
use rustls_acme::futures_rustls::pki_types::{CertificateDer, ServerName};
use rustls_acme::rustls::client::danger::ServerCertVerifier;
use rustls_acme::rustls::{ClientConfig, RootCertStore};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The certificate name the tests order (challtestsrv resolves it to 127.0.0.1).
const DOMAIN: &str = "pushgate.test";
/// Start-up of a helper process.
const STARTUP: Duration = Duration::from_secs(15);
/// An issuance against Pebble takes about 3 s (authorization polling backs off 1 s, 2 s, ...);
/// allow a failed first attempt and its backoff.
const ISSUANCE: Duration = Duration::from_secs(45);
const NGINX: &str = "/usr/sbin/nginx";

// ---------------------------------------------------------------------------------------------
// Scaffolding
// ---------------------------------------------------------------------------------------------

/// A free TCP port on 127.0.0.1 and on [::1] (for nginx's IPv6 listen lines).
fn free_port() -> u16 {
    support::free_port_v4_v6()
}

use support::TempDir;
use support::ports::{Listening, PortTaken, retry_taken_ports_async};

/// A child process whose stdout and stderr are collected; stopped with SIGTERM on drop.
struct Proc {
    name: &'static str,
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        for pipe in [out, err] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        Proc { name, child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Waits until this process itself (not another one on the same port) listens on every one
    /// of `ports`. If it exits, or stays up without a port, because a port was taken (its log,
    /// or `more_log`, says "address already in use"), that is a [`PortTaken`] for the caller to
    /// retry on fresh ports (the process is stopped); any other exit, or no listener within
    /// [`STARTUP`], fails the test.
    async fn listening(
        &mut self,
        ports: &[u16],
        more_log: impl Fn() -> String,
    ) -> Result<(), PortTaken> {
        let end = Instant::now() + STARTUP;
        loop {
            match support::ports::check_listening(&mut self.child, ports) {
                Listening::Yes => return Ok(()),
                Listening::Exited(why) => {
                    // The pipes may still hold its last lines: give their readers a moment.
                    let until = Instant::now() + Duration::from_secs(2);
                    let mut log = format!("{}{}", self.log(), more_log());
                    while !support::ports::says_port_taken(&log) {
                        assert!(
                            Instant::now() < until,
                            "{} {why}, not for a taken port:\n{log}",
                            self.name
                        );
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        log = format!("{}{}", self.log(), more_log());
                    }
                    return Err(PortTaken(format!(
                        "{} {why}: {}",
                        self.name,
                        last_lines(&log, 3)
                    )));
                }
                // pebble-challtestsrv logs a DNS port it cannot bind and carries on without it.
                Listening::NotYet if support::ports::says_port_taken(&self.log()) => {
                    self.stop();
                    return Err(PortTaken(format!(
                        "{}: {}",
                        self.name,
                        last_lines(&self.log(), 3)
                    )));
                }
                Listening::NotYet => {}
            }
            assert!(
                Instant::now() < end,
                "{} is not listening on {ports:?}:\n{}{}",
                self.name,
                self.log(),
                more_log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the log contains `needle`, or fails with the log.
    async fn wait_log(&mut self, needle: &str, within: Duration) {
        let end = Instant::now() + within;
        while !self.log().contains(needle) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before logging {needle:?}:\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                Instant::now() < end,
                "{} did not log {needle:?} in time:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits for the exit (SIGKILL after a deadline).
    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls `f` every 100 ms until it gives `Some`, or fails with `what()`.
async fn poll<T, F, Fut>(within: Duration, mut f: F, what: impl Fn() -> String) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting: {}", what());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn roots(pem: &[u8]) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem) {
        roots.add(c.unwrap()).unwrap();
    }
    assert!(!roots.is_empty(), "no certificate in the root PEM");
    roots
}

fn client_config(roots_pem: &[u8]) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls_acme::rustls::crypto::ring::default_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(roots_pem))
            .with_no_client_auth(),
    )
}

/// A TLS handshake with `addr` for `name`, verified against `roots_pem`; the peer's chain.
async fn handshake(
    addr: SocketAddr,
    name: &str,
    roots_pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(client_config(roots_pem));
    let server_name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(STARTUP, connector.connect(server_name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(tls
        .get_ref()
        .1
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c| c.clone().into_owned())
        .collect())
}

/// Waits until `addr` completes a handshake for [`DOMAIN`] verified against `roots_pem`; the
/// chain it served. `what` describes the wait (and the logs to read) for the failure message.
async fn served_chain(
    addr: SocketAddr,
    roots_pem: &[u8],
    within: Duration,
    what: impl Fn() -> String,
) -> Vec<CertificateDer<'static>> {
    poll(
        within,
        || {
            let root = roots_pem.to_vec();
            async move { handshake(addr, DOMAIN, &root).await.ok() }
        },
        what,
    )
    .await
}

/// `GET path` over HTTPS (HTTP/1.1, `Connection: close`); the status and body.
async fn https_get(
    addr: SocketAddr,
    name: &str,
    path: &str,
    roots_pem: &[u8],
) -> Result<(u16, Vec<u8>), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(client_config(roots_pem));
    let server_name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(STARTUP, tls.read_to_end(&mut buf)).await;
    match read {
        Ok(Ok(_)) => {}
        // Go's server may close without close_notify.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {}
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("response timed out".into()),
    }
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no header end")?;
    let status = String::from_utf8_lossy(&buf[9..12])
        .parse()
        .map_err(|_| "bad status line")?;
    Ok((status, buf[split + 4..].to_vec()))
}

/// The PEM certificate blocks in `text` (handles a chunked body).
fn pem_blocks(text: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(text);
    let mut out = String::new();
    let mut rest = &text[..];
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let end_marker = "-----END CERTIFICATE-----";
        let Some(end) = rest[start..].find(end_marker) else {
            break;
        };
        out.push_str(&rest[start..start + end + end_marker.len()]);
        out.push('\n');
        rest = &rest[start + end + end_marker.len()..];
    }
    out.into_bytes()
}

fn first_cert(chain_pem: &[u8]) -> CertificateDer<'static> {
    CertificateDer::pem_slice_iter(chain_pem)
        .next()
        .expect("no certificate in PEM")
        .unwrap()
}

fn is_placeholder(chain_pem: &[u8]) -> bool {
    let der = first_cert(chain_pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    cert.subject().to_string().contains("placeholder")
}

/// Pebble and its DNS (pebble-challtestsrv) on free ports.
struct Pebble {
    pebble: Proc,
    _dns: Proc,
    acme: SocketAddr,
    management: SocketAddr,
    /// The test CA, trusted for Pebble's own HTTPS (`acme.root_ca_file`).
    ca_file: PathBuf,
    ca_pem: Vec<u8>,
}

impl Pebble {
    /// `http_port`, `tls_port`: where the validator checks HTTP-01 and TLS-ALPN-01 answers. `validity_secs`: lifetime of
    /// the issued certificates (Pebble's default is years).
    async fn start(
        dir: &Path,
        http_port: u16,
        tls_port: u16,
        validity_secs: Option<u64>,
    ) -> Pebble {
        // Pebble's own HTTPS certificate, from a throwaway CA.
        let ca = support::TestCa::new(&["localhost", "127.0.0.1"]);
        std::fs::write(dir.join("pebble-ca.pem"), &ca.ca_pem).unwrap();
        std::fs::write(dir.join("pebble-cert.pem"), &ca.cert_pem).unwrap();
        std::fs::write(dir.join("pebble-key.pem"), &ca.key_pem).unwrap();
        // Its four ports are its own; on a taken one, both start again on fresh ones.
        let (dns, pebble, acme, management) = retry_taken_ports_async("pebble", async |_| {
            let dns_port = free_port();
            let dns_management = free_port();
            let mut cmd = Command::new("pebble-challtestsrv");
            cmd.args(["-dns01", &format!("127.0.0.1:{dns_port}")])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .args(["-management", &format!("127.0.0.1:{dns_management}")])
                .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""]);
            let mut dns = Proc::spawn("pebble-challtestsrv", cmd);
            dns.listening(&[dns_port, dns_management], String::new)
                .await?;
            let acme: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let management: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let mut config = serde_json::json!({"pebble": {
                "listenAddress": acme.to_string(),
                "managementListenAddress": management.to_string(),
                "certificate": dir.join("pebble-cert.pem"),
                "privateKey": dir.join("pebble-key.pem"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }});
            if let Some(v) = validity_secs {
                config["pebble"]["certificateValidityPeriod"] = v.into();
            }
            std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
            let mut cmd = Command::new("pebble");
            cmd.arg("-config")
                .arg(dir.join("pebble.json"))
                .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
                // Real validation, without Pebble's random 0-15 s validation delays, and without
                // its deliberate 5 % nonce rejections (rustls-acme retries a whole order then).
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .env_remove("PEBBLE_VA_ALWAYS_VALID");
            let mut pebble = Proc::spawn("pebble", cmd);
            pebble
                .listening(&[acme.port(), management.port()], String::new)
                .await?;
            Ok((dns, pebble, acme, management))
        })
        .await;
        let ca_pem = ca.ca_pem.into_bytes();
        let p = Pebble {
            pebble,
            _dns: dns,
            acme,
            management,
            ca_file: dir.join("pebble-ca.pem"),
            ca_pem,
        };
        let ca_pem = p.ca_pem.clone();
        poll(
            STARTUP,
            || {
                let ca_pem = ca_pem.clone();
                async move {
                    matches!(
                        https_get(acme, "127.0.0.1", "/dir", &ca_pem).await,
                        Ok((200, _))
                    )
                    .then_some(())
                }
            },
            || format!("pebble to answer /dir:\n{}", p.pebble.log()),
        )
        .await;
        p
    }

    fn directory_url(&self) -> String {
        format!("https://{}/dir", self.acme)
    }

    /// Pebble's root (regenerated on every start), which issued certificates chain to.
    async fn root(&self) -> Vec<u8> {
        let (status, body) = https_get(self.management, "127.0.0.1", "/roots/0", &self.ca_pem)
            .await
            .unwrap();
        assert_eq!(status, 200);
        let pem = pem_blocks(&body);
        assert!(!pem.is_empty(), "no PEM at /roots/0");
        pem
    }

    /// New-order requests Pebble has answered.
    fn orders(&self) -> usize {
        self.pebble.count("/order-plz -> calling handler()")
    }
}

/// `pushgate serve` on `listen` with `config` (a TOML file written here).
fn pushgate(dir: &Path, listen: SocketAddr, config: &str) -> Proc {
    pushgate_bin(
        Path::new(env!("CARGO_BIN_EXE_pushgate")),
        dir,
        listen,
        config,
    )
}

/// [`pushgate_bin`] once it listens on `listen` and `more` itself; [`PortTaken`] when it
/// exited for a taken one.
async fn pushgate_listening(
    bin: &Path,
    dir: &Path,
    listen: SocketAddr,
    more: &[u16],
    config: &str,
) -> Result<Proc, PortTaken> {
    let mut gw = pushgate_bin(bin, dir, listen, config);
    let ports: Vec<u16> = std::iter::once(listen.port())
        .chain(more.iter().copied())
        .collect();
    gw.listening(&ports, String::new).await?;
    Ok(gw)
}

/// [`pushgate`] with another build of the binary (the conformance build, say).
fn pushgate_bin(bin: &Path, dir: &Path, listen: SocketAddr, config: &str) -> Proc {
    let file = dir.join("pushgate.toml");
    std::fs::write(&file, config).unwrap();
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PUSHGATE_") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("serve")
        .arg("--config")
        .arg(&file)
        .args(["--listen", &listen.to_string()])
        .env("PUSHGATE_LOG", "info,rustls_acme=info")
        .env("PUSHGATE_LOG_FORMAT", "plain");
    Proc::spawn("pushgate", cmd)
}

fn acme_config(pebble: &Pebble, cert_dir: &Path, state_dir: &Path, reload: &str) -> String {
    format!(
        r#"[publish]
token = "{token}"
[shutdown]
drain_ms = 10
grace_ms = 2000
[acme]
enabled = true
domains = ["{DOMAIN}"]
contact = "admin@{DOMAIN}"
directory_url = "{url}"
root_ca_file = "{ca}"
cert_dir = "{cert_dir}"
state_dir = "{state_dir}"
reload_command = '''{reload}'''
"#,
        token = support::TOKEN,
        url = pebble.directory_url(),
        ca = pebble.ca_file.display(),
        cert_dir = cert_dir.display(),
        state_dir = state_dir.display(),
    )
}

async fn metric(addr: SocketAddr, sample: &str) -> f64 {
    support::metric(addr, sample)
        .await
        .unwrap_or_else(|| panic!("no sample {sample} in /metrics"))
}

/// nginx with the shipped site template, rendered for this test, in the foreground.
struct Nginx {
    _proc: Proc,
    prefix: PathBuf,
}

impl Nginx {
    fn conf(prefix: &Path) -> PathBuf {
        prefix.join("conf/nginx.conf")
    }

    /// The command that reloads it (what `systemctl reload nginx` does).
    fn reload_command(prefix: &Path) -> String {
        format!(
            "{NGINX} -p {p} -e {p}/logs/error.log -c {c} -s reload",
            p = prefix.display(),
            c = Nginx::conf(prefix).display()
        )
    }

    fn prepare(prefix: &Path, http: u16, https: u16, pushgate: SocketAddr, tls_dir: &Path) {
        for d in ["conf", "logs", "tmp", "static"] {
            std::fs::create_dir_all(prefix.join(d)).unwrap();
        }
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let template = std::fs::read(repo.join("nginx/pushgate.conf")).unwrap();
        let vars = [
            format!("server_name={DOMAIN}"),
            format!("listen_http=127.0.0.1:{http}"),
            format!("listen_http_v6=[::1]:{http}"),
            format!("listen_https=127.0.0.1:{https}"),
            format!("listen_https_v6=[::1]:{https}"),
            format!("https_port_suffix=:{https}"),
            format!("tls_dir={}", tls_dir.display()),
            format!("static_root={}", prefix.join("static").display()),
            format!("pushgate_upstream={pushgate}"),
            // No app behind this site in these tests.
            format!("app_upstream=127.0.0.1:{}", free_port()),
        ];
        let mut render = Command::new(repo.join("nginx/render.sh"))
            .args(&vars)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nginx/render.sh");
        std::io::Write::write_all(&mut render.stdin.take().unwrap(), &template).unwrap();
        let out = render.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "render.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(prefix.join("conf/pushgate.conf"), &out.stdout).unwrap();
        let main = support::nginx_main_conf(prefix, "");
        std::fs::write(Nginx::conf(prefix), main).unwrap();
    }

    /// Starts nginx as [`Nginx::prepare`] configured it, listening on `http` and `https`
    /// itself; [`PortTaken`] when it lost one of them.
    async fn start(prefix: &Path, http: u16, https: u16) -> Result<Nginx, PortTaken> {
        let _ = std::fs::remove_file(prefix.join("logs/error.log"));
        let mut cmd = Command::new(NGINX);
        cmd.arg("-p")
            .arg(prefix)
            .arg("-e")
            .arg(prefix.join("logs/error.log"))
            .arg("-c")
            .arg(Nginx::conf(prefix))
            .args(["-g", "daemon off;"]);
        let mut proc = Proc::spawn("nginx", cmd);
        let error_log =
            || std::fs::read_to_string(prefix.join("logs/error.log")).unwrap_or_default();
        proc.listening(&[http, https], error_log).await?;
        // Its master binds every listen line (IPv4 and IPv6, retrying a taken one for 2 s)
        // before it starts a worker: only then are they all its own.
        let end = Instant::now() + STARTUP;
        while !error_log().contains("start worker process") {
            assert!(
                Instant::now() < end,
                "nginx started no worker:\n{}",
                error_log()
            );
            if let Ok(Some(status)) = proc.child.try_wait() {
                let log = format!("{}{}", proc.log(), error_log());
                assert!(
                    support::ports::says_port_taken(&log),
                    "nginx exited ({status}):\n{log}"
                );
                return Err(PortTaken(format!("nginx exited: {}", last_lines(&log, 3))));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Nginx {
            _proc: proc,
            prefix: prefix.to_path_buf(),
        })
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.prefix.join("logs/error.log")).unwrap_or_default()
    }
}

fn reloads(file: &Path) -> usize {
    std::fs::read_to_string(file)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Behind nginx: the placeholder lets nginx start, the HTTP-01 challenge is answered through
/// nginx, the certificate is exported, the reload command makes nginx serve it, and a restart
/// of pushgate reuses the cached certificate without a new order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_through_nginx_exports_reloads_and_a_restart_reuses_the_certificate() {
    let tmp = TempDir::new("acme", "nginx");
    let prefix = tmp.path("nginx");
    let tls_dir = tmp.path("tls");
    let state_dir = tmp.path("state");
    let reload_log = tmp.path("reloads");
    // Pebble validates through nginx's HTTP port, which proxies to pushgate: when any of them
    // lost its port, all three start again on fresh ones.
    let (http, https, listen, pebble, config, mut gw, placeholder, nginx) =
        retry_taken_ports_async("pebble, pushgate and nginx", async |_| {
            for d in [&prefix, &tls_dir, &state_dir] {
                let _ = std::fs::remove_dir_all(d);
            }
            let _ = std::fs::remove_file(&reload_log);
            let (http, https) = (free_port(), free_port());
            let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let pebble = Pebble::start(&tmp.0, http, free_port(), None).await;
            Nginx::prepare(&prefix, http, https, listen, &tls_dir);
            let reload = format!(
                "{} && echo reloaded >> {}",
                Nginx::reload_command(&prefix),
                reload_log.display()
            );
            let config = acme_config(&pebble, &tls_dir, &state_dir, &reload);
            let bin = Path::new(env!("CARGO_BIN_EXE_pushgate"));
            let mut gw = pushgate_listening(bin, &tmp.0, listen, &[], &config).await?;
            gw.wait_log("listening", STARTUP).await;
            // The placeholder comes first, so that nginx can start before any certificate exists.
            let placeholder = poll(
                STARTUP,
                || async { std::fs::read(tls_dir.join("fullchain.pem")).ok() },
                || format!("the placeholder:\n{}", gw.log()),
            )
            .await;
            let nginx = Nginx::start(&prefix, http, https).await?;
            Ok((http, https, listen, pebble, config, gw, placeholder, nginx))
        })
        .await;
    let root = pebble.root().await;
    let nginx_https: SocketAddr = format!("127.0.0.1:{https}").parse().unwrap();

    // nginx serves Pebble's certificate, verified against Pebble's root, once pushgate has
    // written it and run the reload command.
    let served = served_chain(nginx_https, &root, ISSUANCE, || {
        format!(
            "nginx to serve a certificate from Pebble's root\n--- pushgate:\n{}\n--- pebble:\n{}\n--- nginx:\n{}",
            gw.log(),
            pebble.pebble.log(),
            nginx.error_log()
        )
    })
    .await;
    assert!(is_placeholder(&placeholder));
    let chain = std::fs::read(tls_dir.join("fullchain.pem")).unwrap();
    assert!(!is_placeholder(&chain));
    assert_eq!(
        served[0],
        first_cert(&chain),
        "nginx serves the exported file"
    );
    assert!(
        served.len() >= 2,
        "the chain includes Pebble's intermediate"
    );
    let key_mode = std::fs::metadata(tls_dir.join("privkey.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    assert_eq!(reloads(&reload_log), 1, "{}", gw.log());
    assert_eq!(
        std::fs::read_dir(&tls_dir).unwrap().count(),
        2,
        "only the two files, no temporaries"
    );
    assert!(pebble.pebble.count("Issued certificate serial") >= 1);
    assert!(
        gw.log().contains("answering http-01 challenge"),
        "{}",
        gw.log()
    );
    assert_eq!(
        metric(listen, r#"pushgate_acme_renewals_total{result="ok"}"#).await,
        1.0
    );
    assert_eq!(
        metric(listen, "pushgate_acme_last_renewal_success").await,
        1.0
    );
    assert_eq!(
        metric(listen, "pushgate_acme_certificate_placeholder").await,
        0.0
    );
    let expiry = metric(listen, "pushgate_acme_certificate_expiry_seconds").await;
    assert!(expiry > 86400.0, "expires in {expiry} s");

    // An unknown token is a 404 through nginx (and no challenge is open now).
    let (status, _, _) = support::http(
        format!("127.0.0.1:{http}").parse().unwrap(),
        "GET",
        "/.well-known/acme-challenge/nope",
        &[],
        b"",
    )
    .await;
    assert_eq!(status, 404);

    // Restart: the cached account and certificate are used; no new order, nothing rewritten,
    // no reload.
    let orders = pebble.orders();
    assert!(orders >= 1, "{}", pebble.pebble.log());
    gw.stop();
    let mut gw = pushgate(&tmp.0, listen, &config);
    gw.wait_log("using the cached certificate", STARTUP).await;
    let expiry = metric(listen, "pushgate_acme_certificate_expiry_seconds").await;
    assert!(expiry > 86400.0, "expires in {expiry} s");
    assert_eq!(
        metric(listen, r#"pushgate_acme_renewals_total{result="ok"}"#).await,
        0.0
    );
    assert_eq!(pebble.orders(), orders, "a restart must not order again");
    assert_eq!(std::fs::read(tls_dir.join("fullchain.pem")).unwrap(), chain);
    assert_eq!(reloads(&reload_log), 1);
    // nginx's reload swaps workers gracefully: an old worker may still take a connection for a
    // moment, so wait for the exported certificate rather than taking the first handshake.
    let served = served_chain(nginx_https, &root, STARTUP, || {
        format!(
            "nginx to serve the exported certificate
{}",
            nginx.error_log()
        )
    })
    .await;
    assert_eq!(served[0], first_cert(&chain));
    drop(nginx);
}

/// Straight from pushgate's listener (Pebble's validator connects to it), with certificates
/// that live 15 s: the renewal replaces the certificate and runs the reload command again; with
/// Pebble stopped, the next renewal fails visibly and the current certificate stays in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_replaces_the_certificate_and_a_stopped_ca_leaves_it_in_place() {
    let tmp = TempDir::new("acme", "renewal");
    let tls_dir = tmp.path("tls");
    let reload_log = tmp.path("reloads");
    let reload = format!("echo reloaded >> {}", reload_log.display());
    // Pebble validates on pushgate's port: when that was taken, both start again.
    let (listen, mut pebble, mut gw) = retry_taken_ports_async("pebble and pushgate", async |_| {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let pebble = Pebble::start(&tmp.0, listen.port(), free_port(), Some(15)).await;
        let config = acme_config(&pebble, &tls_dir, &tmp.path("state"), &reload);
        let bin = Path::new(env!("CARGO_BIN_EXE_pushgate"));
        let gw = pushgate_listening(bin, &tmp.0, listen, &[], &config).await?;
        Ok((listen, pebble, gw))
    })
    .await;
    gw.wait_log("listening", STARTUP).await;
    // A client connected through both renewals must stay connected.
    let mut client = support::connect(listen).await;
    support::join(&mut client, "1", "room:renewal", "{}").await;

    let first = poll(
        ISSUANCE,
        || async {
            (reloads(&reload_log) == 1)
                .then(|| std::fs::read(tls_dir.join("fullchain.pem")).unwrap())
        },
        || {
            format!(
                "the first certificate\n--- pushgate:\n{}\n--- pebble:\n{}",
                gw.log(),
                pebble.pebble.log()
            )
        },
    )
    .await;
    assert!(!is_placeholder(&first));
    // Renewal when a third of the lifetime is left: about 10 s after issuance.
    let second = poll(
        ISSUANCE,
        || async {
            (reloads(&reload_log) == 2)
                .then(|| std::fs::read(tls_dir.join("fullchain.pem")).unwrap())
        },
        || format!("the renewed certificate\n--- pushgate:\n{}", gw.log()),
    )
    .await;
    assert_ne!(first_cert(&first), first_cert(&second));
    support::publish(listen, "room:renewal", "after", "2").await;
    assert_eq!(
        support::recv(&mut client).await[4],
        2,
        "the client connected before the renewals still receives"
    );
    assert_eq!(
        metric(listen, r#"pushgate_acme_renewals_total{result="ok"}"#).await,
        2.0
    );
    let root = pebble.root().await;
    let verifier = rustls_acme::rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots(&root)),
        Arc::new(rustls_acme::rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    let chain: Vec<_> = CertificateDer::pem_slice_iter(&second)
        .map(|c| c.unwrap())
        .collect();
    verifier
        .verify_server_cert(
            &chain[0],
            &chain[1..],
            &ServerName::try_from(DOMAIN).unwrap(),
            &[],
            rustls_acme::futures_rustls::pki_types::UnixTime::now(),
        )
        .expect("the renewed chain verifies against Pebble's root");

    // The CA goes away before the next renewal.
    pebble.pebble.stop();
    poll(
        ISSUANCE,
        || async {
            (support::metric(listen, r#"pushgate_acme_renewals_total{result="error"}"#).await?
                >= 1.0)
                .then_some(())
        },
        || format!("a failed renewal\n--- pushgate:\n{}", gw.log()),
    )
    .await;
    assert_eq!(
        metric(listen, "pushgate_acme_last_renewal_success").await,
        0.0
    );
    assert!(
        gw.log().contains("certificate order failed"),
        "{}",
        gw.log()
    );
    assert_eq!(
        std::fs::read(tls_dir.join("fullchain.pem")).unwrap(),
        second
    );
    assert_eq!(reloads(&reload_log), 2);
    let (status, _, _) = support::http(listen, "GET", "/healthz", &[], b"").await;
    assert_eq!(status, 200, "the gateway keeps serving");
}

/// What src/acme.rs promises when the certificate cannot be put in place: an issued
/// certificate that cannot be written to `acme.cert_dir` (here a path under a regular file,
/// unwritable even for root) is counted in `pushgate_acme_export_errors_total`, logged, and
/// retried with backoff (5 s first), and nothing is reloaded; once the directory can be made,
/// the retry writes both files and runs `acme.reload_command`; a reload command that exits
/// non-zero is counted in `pushgate_acme_reload_command_failures_total` and logged with its
/// exit status and stderr. The gateway keeps serving throughout. Validation is straight from
/// pushgate's listener, against Pebble.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_error_and_a_failing_reload_command_are_counted_logged_and_retried() {
    let tmp = TempDir::new("acme", "export-errors");
    std::fs::write(tmp.path("file"), b"x").unwrap();
    let cert_dir = tmp.path("file/tls");
    let reload = "echo the reload went wrong >&2; exit 3";
    let (listen, pebble, mut gw) = retry_taken_ports_async("pebble and pushgate", async |_| {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let pebble = Pebble::start(&tmp.0, listen.port(), free_port(), None).await;
        let config = acme_config(&pebble, &cert_dir, &tmp.path("state"), reload);
        let bin = Path::new(env!("CARGO_BIN_EXE_pushgate"));
        let gw = pushgate_listening(bin, &tmp.0, listen, &[], &config).await?;
        Ok((listen, pebble, gw))
    })
    .await;
    gw.wait_log("acme.cert_dir: cannot write to", STARTUP).await;

    // Issued, but not exported: counted, logged, nothing reloaded.
    gw.wait_log("nginx keeps its current certificate", ISSUANCE)
        .await;
    let logs = |gw: &Proc| {
        format!(
            "--- pushgate:\n{}\n--- pebble:\n{}",
            gw.log(),
            pebble.pebble.log()
        )
    };
    assert_eq!(
        metric(listen, r#"pushgate_acme_renewals_total{result="ok"}"#).await,
        1.0,
        "{}",
        logs(&gw)
    );
    let export_errors = metric(listen, "pushgate_acme_export_errors_total").await;
    assert!(
        export_errors >= 1.0,
        "export errors {export_errors}\n{}",
        logs(&gw)
    );
    assert_eq!(
        metric(listen, "pushgate_acme_reload_command_failures_total").await,
        0.0,
        "nothing was written, so nothing was reloaded\n{}",
        logs(&gw)
    );
    assert!(
        gw.log().contains("retry_in_s=5"),
        "the first retry comes after 5 s:\n{}",
        logs(&gw)
    );
    assert!(!cert_dir.exists());

    // The directory can be made now: the retry writes the files and runs the reload command,
    // which fails.
    std::fs::remove_file(tmp.path("file")).unwrap();
    gw.wait_log("acme.reload_command failed", STARTUP).await;
    let chain = std::fs::read(cert_dir.join("fullchain.pem")).expect("exported on the retry");
    assert!(!is_placeholder(&chain));
    assert!(cert_dir.join("privkey.pem").exists());
    let failed = gw
        .log()
        .lines()
        .find(|l| l.contains("acme.reload_command failed"))
        .unwrap()
        .to_string();
    assert!(
        failed.contains("exit status: 3") && failed.contains("the reload went wrong"),
        "the log line gives the exit status and stderr: {failed}"
    );
    assert_eq!(
        metric(listen, "pushgate_acme_reload_command_failures_total").await,
        1.0,
        "{}",
        logs(&gw)
    );
    assert_eq!(
        metric(listen, "pushgate_acme_export_errors_total").await,
        export_errors,
        "the retry succeeded"
    );
    assert_eq!(
        metric(listen, "pushgate_acme_certificate_placeholder").await,
        0.0
    );
    // Still serving.
    let pos = support::publish(listen, "room:acme", "m", "{}").await;
    assert!(pos.ends_with(":1"), "{pos}");
}

/// No CA reachable and an export directory that cannot be created: both are logged with the
/// key to fix and counted, and the gateway serves as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_ca_and_unwritable_cert_dir_are_reported_and_the_gateway_keeps_serving() {
    let tmp = TempDir::new("acme", "unreachable");
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let closed = free_port();
    // A regular file where a directory is needed: unwritable even for root.
    std::fs::write(tmp.path("file"), b"x").unwrap();
    let ca = support::TestCa::new(&["localhost"]);
    std::fs::write(tmp.path("ca.pem"), &ca.ca_pem).unwrap();
    let config = format!(
        r#"[publish]
token = "{token}"
[acme]
enabled = true
domains = ["{DOMAIN}"]
directory_url = "https://127.0.0.1:{closed}/dir"
root_ca_file = "{ca}"
cert_dir = "{cert_dir}"
state_dir = "{state}"
"#,
        token = support::TOKEN,
        ca = tmp.path("ca.pem").display(),
        cert_dir = tmp.path("file/tls").display(),
        state = tmp.path("state").display(),
    );
    let bin = Path::new(env!("CARGO_BIN_EXE_pushgate"));
    let (listen, mut gw) = retry_taken_ports_async("pushgate", async |attempt| {
        let listen = match attempt {
            0 => listen,
            _ => format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        };
        Ok((
            listen,
            pushgate_listening(bin, &tmp.0, listen, &[], &config).await?,
        ))
    })
    .await;
    gw.wait_log("listening", STARTUP).await;
    gw.wait_log("acme.cert_dir: cannot write to", STARTUP).await;
    gw.wait_log("certificate order failed", STARTUP).await;
    assert!(
        gw.log().contains(&format!("127.0.0.1:{closed}")),
        "the log names the directory URL:\n{}",
        gw.log()
    );
    assert!(metric(listen, r#"pushgate_acme_renewals_total{result="error"}"#).await >= 1.0);
    assert_eq!(
        metric(listen, "pushgate_acme_last_renewal_success").await,
        0.0
    );
    assert_eq!(
        metric(listen, "pushgate_acme_certificate_expiry_timestamp_seconds").await,
        0.0
    );
    let (status, _, _) = support::http(listen, "GET", "/healthz", &[], b"").await;
    assert_eq!(status, 200);
    let pos = support::publish(listen, "room:acme", "m", "{}").await;
    assert!(pos.ends_with(":1"), "{pos}");
}

/// A bad domain list is refused before serving, naming the key.
#[test]
fn a_bad_domain_list_is_a_config_error() {
    let tmp = TempDir::new("acme", "badconfig");
    let file = tmp.path("pushgate.toml");
    std::fs::write(
        &file,
        "[acme]\nenabled = true\ndomains = [\"*.example.com\", \"example\"]\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pushgate"))
        .arg("check-config")
        .arg("--config")
        .arg(&file)
        .env_remove("PUSHGATE_ACME_DOMAINS")
        .env_remove("PUSHGATE_ACME_ENABLED")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("acme.domains: \"*.example.com\""), "{err}");
    assert!(err.contains("acme.domains: \"example\""), "{err}");
}

/// A TLS connection to `addr` for `name` offering `alpn`, verified against `roots_pem`.
async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    alpn: &[&[u8]],
    roots_pem: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut config = (*client_config(roots_pem)).clone();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .expect("TLS handshake")
}

/// One HTTP/1.1 request over TLS with ALPN `http/1.1`; the status line's code and the body.
async fn https1(addr: SocketAddr, path: &str, roots_pem: &[u8]) -> (u16, String) {
    let mut tls = tls_connect(addr, DOMAIN, &[b"http/1.1"], roots_pem).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(STARTUP, tls.read_to_end(&mut buf))
        .await
        .expect("https response timed out");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    (status, body)
}

/// A Phoenix join and a heartbeat over a client WebSocket, whatever carries it.
async fn phoenix_join_and_heartbeat<S>(
    mut ws: tokio_tungstenite::WebSocketStream<S>,
) -> tokio_tungstenite::WebSocketStream<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let next = async |ws: &mut tokio_tungstenite::WebSocketStream<S>| loop {
        let m = tokio::time::timeout(STARTUP, ws.next())
            .await
            .expect("no frame in time")
            .expect("stream ended")
            .expect("websocket error");
        if let Message::Text(t) = m {
            return serde_json::from_str::<serde_json::Value>(&t).unwrap();
        }
    };
    ws.send(Message::text(r#"["1","1","room:edge","phx_join",{}]"#))
        .await
        .unwrap();
    let reply = next(&mut ws).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    ws.send(Message::text(r#"[null,"2","phoenix","heartbeat",{}]"#))
        .await
        .unwrap();
    assert_eq!(next(&mut ws).await[1], "2");
    ws
}

/// Sends a close frame, expects the server's reply, then a clean end of the underlying stream.
async fn close_and_see_a_clean_end<S>(mut ws: tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::Close(None)).await.unwrap();
    let reply = tokio::time::timeout(STARTUP, ws.next()).await.unwrap();
    assert!(matches!(reply, Some(Ok(Message::Close(_)))), "{reply:?}");
    let mut rest = [0u8; 64];
    let end = tokio::time::timeout(STARTUP, ws.get_mut().read(&mut rest)).await;
    assert!(matches!(end, Ok(Ok(0))), "the stream's end: {end:?}");
}

/// At the edge: TLS-ALPN-01 answered on pushgate's own TLS listener, then HTTPS with HTTP/1.1
/// and HTTP/2 by ALPN verified against Pebble's root (LongPoll over HTTP/2 included), a Phoenix
/// WebSocket over TLS by HTTP/1.1 upgrade and over HTTP/2 by RFC 8441 extended CONNECT, and the
/// plain listener redirecting to HTTPS.
/// Pebble, and pushgate (the binary `bin`) at the edge: `tls.listen` on a free port plus the
/// `[tls]` lines in `tls_extra`, its certificate issued by TLS-ALPN-01 (Pebble's HTTP-01
/// validator points at a closed port). Returns once the TLS listener serves that certificate.
struct Edge {
    _pebble: Pebble,
    gw: Proc,
    /// The plain listener (`/metrics`).
    listen: SocketAddr,
    https: SocketAddr,
    /// Pebble's root, which the served chain verifies against.
    root: Vec<u8>,
    served: Vec<CertificateDer<'static>>,
    /// The other ports of [`Edge::start_with_ports`].
    more: Vec<u16>,
}

impl Edge {
    /// `tls_extra`: more of the `[tls]` section.
    async fn start(tmp: &TempDir, bin: &Path, tls_extra: &str) -> Edge {
        Edge::start_with_ports(tmp, bin, 0, |_| tls_extra.to_string()).await
    }

    /// [`Edge::start`] with `more` other ports, fresh on each attempt, which pushgate listens
    /// on too; `tls_extra(ports)` names them. They are in [`Edge::more`].
    async fn start_with_ports(
        tmp: &TempDir,
        bin: &Path,
        more: usize,
        tls_extra: impl Fn(&[u16]) -> String,
    ) -> Edge {
        // Pebble validates on pushgate's TLS port: when one was taken, both start again.
        let (listen, https, more, pebble, gw) =
            retry_taken_ports_async("pebble and pushgate", async |_| {
                for d in ["tls", "state"] {
                    let _ = std::fs::remove_dir_all(tmp.path(d));
                }
                let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
                let https: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
                let more: Vec<u16> = (0..more).map(|_| free_port()).collect();
                let pebble = Pebble::start(&tmp.0, free_port(), https.port(), None).await;
                let config = format!(
                    "{}challenge = \"tls-alpn-01\"\n[tls]\nlisten = \"{https}\"\n{}",
                    acme_config(&pebble, &tmp.path("tls"), &tmp.path("state"), ""),
                    tls_extra(&more)
                );
                let mut ports = vec![https.port()];
                ports.extend_from_slice(&more);
                let gw = pushgate_listening(bin, &tmp.0, listen, &ports, &config).await?;
                Ok((listen, https, more, pebble, gw))
            })
            .await;
        let root = pebble.root().await;
        let served = served_chain(https, &root, ISSUANCE, || {
            format!(
                "pushgate's TLS listener to serve Pebble's certificate\n--- pushgate:\n{}\n--- pebble:\n{}",
                gw.log(),
                pebble.pebble.log()
            )
        })
        .await;
        Edge {
            _pebble: pebble,
            gw,
            listen,
            https,
            root,
            served,
            more,
        }
    }

    /// The issued chain, once exported to `cert_dir` (rustls-acme serves a new certificate
    /// before it emits the event the exporter acts on: the file can lag a moment).
    async fn exported_chain(&self, tmp: &TempDir) -> Vec<u8> {
        let chain_file = tmp.path("tls/fullchain.pem");
        poll(
            STARTUP,
            || async {
                std::fs::read(&chain_file)
                    .ok()
                    .filter(|pem| !is_placeholder(pem))
            },
            || format!("the issued certificate to be exported:\n{}", self.gw.log()),
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_at_the_edge_serves_http1_and_http2_and_redirects() {
    use http_body_util::BodyExt;
    let tmp = TempDir::new("acme", "edge");
    let bin = Path::new(env!("CARGO_BIN_EXE_pushgate"));
    let edge = Edge::start_with_ports(&tmp, bin, 1, |p| {
        format!("redirect_listen = \"127.0.0.1:{}\"\n", p[0])
    })
    .await;
    let redirect: SocketAddr = format!("127.0.0.1:{}", edge.more[0]).parse().unwrap();
    let exported = edge.exported_chain(&tmp).await;
    let Edge {
        _pebble,
        gw,
        listen,
        https,
        root,
        served,
        ..
    } = edge;
    assert!(
        gw.log().contains("answered a tls-alpn-01 challenge"),
        "{}",
        gw.log()
    );
    assert!(!gw.log().contains("answering http-01 challenge"));
    assert_eq!(served[0], first_cert(&exported));

    // HTTP/1.1 by ALPN.
    let (status, body) = https1(https, "/healthz", &root).await;
    assert_eq!(status, 200, "{body}");
    // A Phoenix WebSocket over TLS (HTTP/1.1 upgrade).
    let tls = tls_connect(https, DOMAIN, &[b"http/1.1"], &root).await;
    let (ws, _) =
        tokio_tungstenite::client_async(format!("wss://{DOMAIN}/socket/websocket?vsn=2.0.0"), tls)
            .await
            .expect("websocket over TLS");
    // The closing handshake, then TLS's own: close_notify, not a bare end of the TCP stream
    // (which rustls reports as an unexpected EOF).
    close_and_see_a_clean_end(phoenix_join_and_heartbeat(ws).await).await;

    // HTTP/2 by ALPN: a request, and a LongPoll session opening.
    let tls = tls_connect(https, DOMAIN, &[b"h2", b"http/1.1"], &root).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for (path, want) in [("/healthz", "ok"), ("/socket/longpoll?vsn=2.0.0", "token")] {
        let req = hyper::Request::get(format!("https://{DOMAIN}{path}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 200, "{path}: {body}");
        assert!(body.contains(want), "{path}: {body}");
    }

    // A Phoenix WebSocket over HTTP/2 (RFC 8441 extended CONNECT) on the same connection.
    let mut req = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri(format!("https://{DOMAIN}/socket/websocket?vsn=2.0.0"))
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let resp = h2.send_request(req).await.expect("extended CONNECT");
    assert_eq!(resp.status(), 200);
    let upgraded = hyper::upgrade::on(resp).await.expect("h2 websocket stream");
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(upgraded),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    // The closing handshake over an HTTP/2 stream: the reply arrives, then the stream ends.
    close_and_see_a_clean_end(phoenix_join_and_heartbeat(ws).await).await;
    for (http, want) in [("1.1", 1.0), ("2", 1.0)] {
        let sample = format!("pushgate_websocket_upgrades_total{{http=\"{http}\"}}");
        assert_eq!(metric(listen, &sample).await, want, "{sample}");
    }

    // The plain listener redirects to HTTPS, keeping path and query.
    let request = format!(
        "GET /socket/longpoll?vsn=2.0.0 HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n"
    );
    let (status, head, _) = support::raw_http(redirect, request.as_bytes())
        .await
        .unwrap();
    assert_eq!(status, 301, "{head}");
    let location = format!(
        "location: https://{DOMAIN}:{}/socket/longpoll?vsn=2.0.0",
        https.port()
    );
    assert!(head.to_ascii_lowercase().contains(&location), "{head}");
    assert!(metric(listen, r#"pushgate_acme_renewals_total{result="ok"}"#).await >= 1.0);
}

/// An HTTP/2 connection to the edge over TLS (ALPN `h2`); the connection's task is returned so
/// a test can see when the server ends it.
async fn h2_connect(
    addr: SocketAddr,
    roots_pem: &[u8],
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let tls = tls_connect(addr, DOMAIN, &[b"h2"], roots_pem).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    (h2, tokio::spawn(conn))
}

/// GET `path` on an HTTP/2 connection: status and body.
async fn h2_get(
    h2: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    path: &str,
) -> (u16, String) {
    use http_body_util::BodyExt;
    let req = hyper::Request::get(format!("https://{DOMAIN}{path}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(STARTUP, h2.send_request(req))
        .await
        .expect("h2 answer in time")
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// An RFC 8441 WebSocket (extended CONNECT) on an HTTP/2 connection: the upgraded stream, or
/// the status of the refusal.
async fn h2_websocket(
    h2: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
) -> Result<hyper::upgrade::Upgraded, u16> {
    let mut req = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri(format!("https://{DOMAIN}/socket/websocket?vsn=2.0.0"))
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let resp = tokio::time::timeout(STARTUP, h2.send_request(req))
        .await
        .expect("extended CONNECT answered in time")
        .expect("extended CONNECT");
    if resp.status() != 200 {
        return Err(resp.status().as_u16());
    }
    Ok(hyper::upgrade::on(resp).await.expect("h2 websocket stream"))
}

/// Reads `stream` until the server ends it; fails if it is still open at `by`.
async fn ends_by<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, by: Instant, what: &str) {
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(by.into(), stream.read(&mut chunk)).await {
            Err(_) => panic!("{what}: still open at its deadline"),
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
        }
    }
}

/// Issue 16, item 8: the edge listener serves what the internet needs (`/socket/*`, health
/// checks, ACME, the demo page) and answers 404 for `/api/*` and `/metrics`, over HTTP/1.1 and
/// HTTP/2, unless `tls.serve_api_and_metrics` opts in; the plain listener serves them either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_serves_api_and_metrics_only_when_opted_in() {
    let bin = Path::new(env!("CARGO_BIN_EXE_pushgate"));
    for opted_in in [false, true] {
        let tmp = TempDir::new("acme", &format!("edge-paths-{opted_in}"));
        let edge = Edge::start(&tmp, bin, &format!("serve_api_and_metrics = {opted_in}\n")).await;
        let (https, root) = (edge.https, edge.root.clone());
        let (mut h2, _conn) = h2_connect(https, &root).await;
        for path in ["/healthz", "/readyz", "/", "/socket/longpoll?vsn=2.0.0"] {
            let (status, body) = h2_get(&mut h2, path).await;
            assert_eq!(status, 200, "h2 {path}: {body}");
            let (status, body) = https1(https, path, &root).await;
            assert_eq!(status, 200, "http/1.1 {path}: {body}");
        }
        // Unauthenticated: 401 where served (never 200 without the token), 404 where not.
        let served = [
            ("/metrics", 200),
            ("/api/publish", 405),
            ("/api/presence", 401),
        ];
        for (path, status_if_served) in served {
            let want = if opted_in { status_if_served } else { 404 };
            let (status, body) = h2_get(&mut h2, path).await;
            assert_eq!(status, want, "h2 {path} (opted in: {opted_in}): {body}");
            let (status, body) = https1(https, path, &root).await;
            assert_eq!(
                status, want,
                "http/1.1 {path} (opted in: {opted_in}): {body}"
            );
        }
        // The loopback listener serves them in any case.
        let (status, _, _) = support::http(edge.listen, "GET", "/metrics", &[], b"").await;
        assert_eq!(status, 200);
        let (status, _, _) = support::http(edge.listen, "GET", "/api/presence", &[], b"").await;
        assert_eq!(status, 401);
    }
}

/// Issue 16, item 8: every WebSocket holds a `server.max_connections` slot, each RFC 8441
/// stream on an HTTP/2 connection included; one that cannot get a slot is refused with 503
/// and counted (`pushgate_refusals_total{cause="session_cap"}`), and gets it once one is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_websocket_at_the_edge_holds_a_connection_slot() {
    let tmp = TempDir::new("acme", "edge-slots");
    let bin = Path::new(env!("CARGO_BIN_EXE_pushgate"));
    // Five slots: one waiting in each listener's accept loop (a slot is taken before each
    // accept), the HTTP/2 connection, and two WebSockets on it.
    let edge = Edge::start(&tmp, bin, "[server]\nmax_connections = 5\n").await;
    let (https, root) = (edge.https, edge.root.clone());
    let (h2, _conn) = h2_connect(https, &root).await;
    // (Retried: the certificate checks' connections may still be closing.)
    let websocket = || {
        let mut h2 = h2.clone();
        async move { h2_websocket(&mut h2).await.ok() }
    };
    let first = poll(STARTUP, websocket, || "a first WebSocket".into()).await;
    let second = poll(STARTUP, websocket, || "a second WebSocket".into()).await;
    let mut h2c = h2.clone();
    assert_eq!(
        h2_websocket(&mut h2c).await.err(),
        Some(503),
        "a third WebSocket"
    );
    // A slot comes free: the next WebSocket gets it.
    drop(second);
    let third = poll(STARTUP, websocket, || {
        "a WebSocket once a slot is free".into()
    })
    .await;
    drop((first, third, h2c));
    let refused = r#"pushgate_refusals_total{cause="session_cap"}"#;
    assert!(metric(edge.listen, refused).await >= 1.0);
}

/// Issue 16, items 3 and 8: every read at the edge has a deadline. A socket that never starts
/// TLS, a TLS connection that never sends a request (HTTP/1.1 or HTTP/2), and an HTTP/2
/// connection left idle after its request are all closed on time, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_connections_have_read_deadlines() {
    let tmp = TempDir::new("acme", "edge-deadlines");
    let bin = Path::new(env!("CARGO_BIN_EXE_pushgate"));
    // Short deadlines, though long enough for Pebble's validation handshake.
    let edge = Edge::start(
        &tmp,
        bin,
        "handshake_timeout_ms = 1000\n[server]\nheader_read_timeout_ms = 1000\n\
         keepalive_timeout_ms = 1500\n",
    )
    .await;
    let (https, root) = (edge.https, edge.root.clone());
    let slack = Duration::from_secs(2);

    // No TLS at all: the handshake deadline.
    let mut silent = tokio::net::TcpStream::connect(https).await.unwrap();
    let start = Instant::now();
    ends_by(
        &mut silent,
        start + Duration::from_millis(1000) + slack,
        "silent TCP",
    )
    .await;

    // TLS, then nothing: the header deadline, over HTTP/1.1 and HTTP/2.
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let mut tls = tls_connect(https, DOMAIN, &[alpn], &root).await;
        let start = Instant::now();
        let what = format!("TLS ({}) without a request", String::from_utf8_lossy(alpn));
        ends_by(&mut tls, start + Duration::from_millis(1000) + slack, &what).await;
    }

    // HTTP/2: a request, then nothing open: the keep-alive deadline (GOAWAY, then the end).
    let (mut h2, conn) = h2_connect(https, &root).await;
    assert_eq!(h2_get(&mut h2, "/healthz").await.0, 200);
    let idle_from = Instant::now();
    let ended = tokio::time::timeout(Duration::from_millis(1500) + slack, conn).await;
    assert!(
        ended.is_ok(),
        "an idle HTTP/2 connection still open after its deadline"
    );
    assert!(idle_from.elapsed() >= Duration::from_millis(1400));

    // A WebSocket keeps its HTTP/2 connection open past that deadline.
    let (mut h2, conn) = h2_connect(https, &root).await;
    let ws = h2_websocket(&mut h2).await.expect("websocket");
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(ws),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    let mut ws = phoenix_join_and_heartbeat(ws).await;
    tokio::time::sleep(Duration::from_millis(1500) + slack).await; // longer than the deadline
    assert!(
        !conn.is_finished(),
        "a connection with an open WebSocket was closed"
    );
    {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        ws.send(Message::text(r#"[null,"9","phoenix","heartbeat",{}]"#))
            .await
            .unwrap();
        let reply = tokio::time::timeout(STARTUP, ws.next()).await;
        assert!(
            matches!(&reply, Ok(Some(Ok(Message::Text(t)))) if t.contains("\"9\"")),
            "{reply:?}"
        );
    }
    close_and_see_a_clean_end(ws).await;

    let timeouts = metric(edge.listen, r#"pushgate_refusals_total{cause="timeout"}"#).await;
    assert!(timeouts >= 4.0, "{timeouts}");
}

/// HTTP/2 at the edge: a client that stops answering PINGs is closed, even with a request
/// under way (here a POST whose body never comes, with `server.body_timeout_ms` far away).
/// The client is raw frames over TLS, since every HTTP/2 library answers PINGs by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_stops_answering_pings_is_closed() {
    let tmp = TempDir::new("acme", "edge-ping");
    let bin = Path::new(env!("CARGO_BIN_EXE_pushgate"));
    let edge = Edge::start(
        &tmp,
        bin,
        "http2_ping_interval_ms = 500\n[server]\nbody_timeout_ms = 60000\n",
    )
    .await;
    let mut tls = tls_connect(edge.https, DOMAIN, &[b"h2"], &edge.root).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    // HPACK, literal strings: :method POST (static 3), :scheme https (static 7), :path and
    // :authority (names static 4 and 1).
    let literal = |name_index: u8, value: &str| {
        let mut b = vec![0x40 | name_index, value.len() as u8];
        b.extend_from_slice(value.as_bytes());
        b
    };
    let mut block = vec![0x83, 0x87];
    block.extend(literal(4, "/socket/longpoll?vsn=2.0.0"));
    block.extend(literal(1, DOMAIN));
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    out.extend(frame(0x1, 0x4, 1, &block)); // HEADERS, END_HEADERS, no END_STREAM: a body follows
    tls.write_all(&out).await.unwrap();
    tls.flush().await.unwrap();
    // From here the client reads what comes but answers nothing (no SETTINGS ack, no PING ack).
    let sent = Instant::now();
    ends_by(
        &mut tls,
        sent + Duration::from_secs(5),
        "an HTTP/2 client that ignores PINGs",
    )
    .await;
    assert!(
        sent.elapsed() >= Duration::from_millis(500),
        "closed before any PING was due"
    );
}

/// RFC 6455 conformance over the TLS edge: Autobahn|Testsuite's fuzzing client against the
/// conformance build (Cargo feature `autobahn-echo`, which echoes data messages) behind its own
/// TLS listener with a certificate issued by Pebble, so the frame layer is judged through the
/// adapter that TLS streams take (`Polled`: staged reads, explicitly flushed writes), as
/// tests/js/autobahn.test.js judges it on a plain socket. Needs AUTOBAHN_SERVER_BIN (that build)
/// and WSTEST (from scripts/autobahn-env.sh): ignored by a plain `cargo test`; scripts/test.sh
/// sets both and runs it (`--include-ignored`), and run without them it fails. (Not a
/// `PUSHGATE_` name: every pushgate a test starts would take that for a config key.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AUTOBAHN_SERVER_BIN and WSTEST; scripts/test.sh runs it"]
async fn autobahn_conformance_over_tls_at_the_edge() {
    let (Some(bin), Some(wstest)) = (
        std::env::var_os("AUTOBAHN_SERVER_BIN"),
        std::env::var_os("WSTEST"),
    ) else {
        panic!("set AUTOBAHN_SERVER_BIN and WSTEST (scripts/test.sh does)");
    };
    let tmp = TempDir::new("acme", "autobahn-tls");
    // Autobahn opens one connection per case from one address, hundreds in a few seconds: the
    // per-address connect rate (a protection, tested in tests/admission.rs) is not under test.
    let edge = Edge::start(
        &tmp,
        Path::new(&bin),
        "[limits]\nconnect_rate_per_address = 0\n",
    )
    .await;
    let Edge {
        _pebble,
        gw,
        https,
        root,
        ..
    } = edge;
    assert!(
        gw.log().contains("autobahn-echo"),
        "not the conformance build:\n{}",
        gw.log()
    );

    // Which cases run and which verdicts conform: shared with tests/js/autobahn.test.js.
    let policy: serde_json::Value =
        serde_json::from_str(include_str!("autobahn-policy.json")).unwrap();
    let reports = tmp.path("reports");
    let spec = serde_json::json!({
        "outdir": reports,
        "servers": [{"agent": "pushgate", "url": format!("wss://{https}/socket/websocket?vsn=2.0.0")}],
        "cases": ["*"],
        "exclude-cases": policy["exclude-cases"],
        "exclude-agent-cases": {},
    });
    std::fs::write(tmp.path("spec.json"), spec.to_string()).unwrap();
    let run = tokio::process::Command::new(&wstest)
        .args(["-m", "fuzzingclient", "-s", "spec.json"])
        .current_dir(&tmp.0)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("wstest to finish within 5 minutes")
        .expect("wstest to start");
    let output =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "wstest failed:\n{output}");

    // wstest exits 0 whatever the verdicts: they are in its report.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reports.join("index.json")).unwrap()).unwrap();
    let results = index["pushgate"].as_object().cloned().unwrap_or_default();
    assert!(
        results.len() > 200,
        "only {} cases ran:\n{output}",
        results.len()
    );
    let conforming = policy["conforms"].as_array().unwrap();
    let conforms = |v: &serde_json::Value| conforming.contains(v);
    let failed: Vec<String> = results
        .iter()
        .filter(|(_, r)| !conforms(&r["behavior"]) || !conforms(&r["behaviorClose"]))
        .map(|(id, r)| format!("{id} {}/{}", r["behavior"], r["behaviorClose"]))
        .collect();
    assert!(
        failed.is_empty(),
        "cases that do not conform over TLS:\n{}",
        failed.join("\n")
    );
    // The node is still well after the fuzzing.
    let (status, _) = https1(https, "/healthz", &root).await;
    assert_eq!(status, 200);
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}

/// The demo page in a real browser at the edge: headless Chromium loads it from pushgate's own
/// TLS listener (the certificate Pebble issued), joins over wss:// and over LongPoll, publishes
/// through the page's form and sees the message, with the page, the publish and the polls on
/// HTTP/2 (ALPN). The browser is driven by tests/js/edge-browser.js (playwright-core, from
/// `npm ci` in tests/js). Needs EDGE_BROWSER_TEST=1: ignored by a plain `cargo test`;
/// scripts/test.sh sets it after `npm ci` and runs it (`--include-ignored`), and run without it
/// it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs EDGE_BROWSER_TEST=1 after `npm ci` in tests/js; scripts/test.sh runs it"]
async fn demo_page_in_chromium_at_the_edge() {
    assert!(
        std::env::var_os("EDGE_BROWSER_TEST").is_some(),
        "set EDGE_BROWSER_TEST=1 after `npm ci` in tests/js (scripts/test.sh does)"
    );
    let tmp = TempDir::new("acme", "edge-browser");
    // The page's publish form posts to /api/publish, which the edge serves only when opted in.
    let edge = Edge::start(
        &tmp,
        Path::new(env!("CARGO_BIN_EXE_pushgate")),
        "serve_api_and_metrics = true\n",
    )
    .await;
    let chain = edge.exported_chain(&tmp).await;
    assert_eq!(edge.served[0], first_cert(&chain));
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    let run = tokio::process::Command::new("node")
        .arg("edge-browser.js")
        .current_dir(&js)
        .env(
            "EDGE_ORIGIN",
            format!("https://{DOMAIN}:{}", edge.https.port()),
        )
        .env("EDGE_CHAIN", tmp.path("tls/fullchain.pem"))
        .env("EDGE_TOKEN", support::TOKEN)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("edge-browser.js to finish within 2 minutes")
        .expect("node to start");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!(
        "edge-browser.js:\n{stdout}{}\n--- pushgate:\n{}",
        String::from_utf8_lossy(&out.stderr),
        edge.gw.log()
    );
    assert!(out.status.success(), "{report}");
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    for (transport, kinds) in [
        ("websocket", &["page", "api/publish"][..]),
        ("longpoll", &["page", "api/publish", "socket/longpoll"][..]),
    ] {
        for kind in kinds {
            assert_eq!(seen[transport][kind], "h2", "{transport} {kind}: {report}");
        }
    }
    for transport in ["websocket", "longpoll"] {
        let sample = format!("pushgate_messages_delivered_total{{transport=\"{transport}\"}}");
        assert!(metric(edge.listen, &sample).await >= 1.0, "{report}");
    }
    // Closing the page closed its WebSocket: the connection is gone, not left open.
    poll(
        STARTUP,
        || async {
            let open = metric(
                edge.listen,
                r#"pushgate_connections{transport="websocket"}"#,
            )
            .await;
            (open == 0.0).then_some(())
        },
        || format!("the browser's WebSocket to be closed:\n{}", edge.gw.log()),
    )
    .await;
    // Chromium's WebSocket rode the page's HTTP/2 connection (RFC 8441), not a new HTTP/1.1 one.
    let h2 = metric(
        edge.listen,
        r#"pushgate_websocket_upgrades_total{http="2"}"#,
    )
    .await;
    let h1 = metric(
        edge.listen,
        r#"pushgate_websocket_upgrades_total{http="1.1"}"#,
    )
    .await;
    assert_eq!((h2, h1), (1.0, 0.0), "{report}");
    assert!(!edge.gw.log().contains("panicked"), "{}", edge.gw.log());
}
