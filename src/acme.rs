//! Certificates from an ACME CA (Let's Encrypt) with `rustls-acme`, exported for nginx.
//!
//! What it owns: the `[acme]` task ([`run`]), the state directory (account key and issued
//! certificates, so a restart reuses them without a new order), and the export directory
//! (`fullchain.pem`, `privkey.pem`). It publishes the open challenges in
//! [`crate::challenges`] and answers no request itself: the router answers HTTP-01
//! (`/.well-known/acme-challenge/`), and at the edge [`crate::tls`] serves with the resolver
//! (which also answers TLS-ALPN-01).
//!
//! The flow: at start, when the export directory has no certificate yet, a short-lived
//! self-signed placeholder is written so that nginx can start. `rustls-acme`'s [`AcmeState`]
//! stream then loads the cached certificate or orders one, and renews it when a third of its
//! lifetime is left (30 days before expiry for Let's Encrypt's 90-day certificates); a failed
//! order is retried with exponential backoff (1 s, 2 s, 4 s, ... up to about 18 h). Every new
//! certificate is written atomically (temporary file, then rename; `privkey.pem` first with
//! mode 0600, `fullchain.pem` last), then `acme.reload_command` runs. A failure anywhere is
//! logged with the key to fix and counted in `/metrics`; the gateway keeps serving, and nginx
//! keeps the certificate it has.

use crate::app::App;
use crate::config::{AcmeChallenge, AcmeConfig};
use crate::metrics::Metrics;
use futures_util::StreamExt;
use rustls_acme::futures_rustls::pki_types::CertificateDer;
use rustls_acme::futures_rustls::pki_types::pem::PemObject;
use rustls_acme::rustls::ClientConfig;
use rustls_acme::{AcmeState, EventError, EventOk, UseChallenge};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The exported certificate chain (leaf first).
pub const FULLCHAIN_FILE: &str = "fullchain.pem";
/// The exported private key (PKCS#8), mode 0600.
pub const PRIVKEY_FILE: &str = "privkey.pem";
/// How long the placeholder certificate is valid: long enough for nginx to start and for an
/// order to succeed; short so that a forgotten placeholder is noticed.
const PLACEHOLDER_LIFETIME: time::Duration = time::Duration::days(7);
/// `acme.reload_command` is killed after this long.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// A failed export (unwritable `acme.cert_dir`) is retried after this, doubling up to
/// [`EXPORT_RETRY_MAX`].
const EXPORT_RETRY_FIRST: Duration = Duration::from_secs(5);
/// The longest wait between two export attempts.
const EXPORT_RETRY_MAX: Duration = Duration::from_secs(600);

/// Problems the ACME task reports; each names the config key to look at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `acme.root_ca_file` cannot be read or holds no certificate (the message names the key).
    #[error("{0}")]
    RootCa(String),
    #[error("acme.cert_dir: cannot write to {path}: {source}")]
    CertDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("acme.state_dir: cannot use {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("placeholder certificate: {0}")]
    Placeholder(#[from] rcgen::Error),
}

/// The ACME task: runs until `app.shutdown`. Spawned on `app.tracker` when `acme.enabled`.
pub async fn run(app: Arc<App>) {
    let c = &app.config.acme;
    let metrics = &app.metrics;
    metrics.acme_enabled.store(1, Relaxed);
    let cert_dir = PathBuf::from(&c.cert_dir);
    tracing::info!(
        domains = ?c.domains,
        directory = c.directory(),
        cert_dir = %cert_dir.display(),
        state_dir = c.state_dir,
        "acme: starting"
    );
    match ensure_placeholder(&cert_dir, &c.domains).await {
        Ok(true) => {
            tracing::info!(cert_dir = %cert_dir.display(), "acme: wrote a self-signed placeholder until the first certificate");
            metrics.acme_placeholder.store(1, Relaxed);
        }
        Ok(false) => {}
        Err(e) => tracing::error!("acme: {e}"),
    }
    if let Ok(pem) = std::fs::read(cert_dir.join(FULLCHAIN_FILE)) {
        record_expiry(metrics, &pem);
    }
    let client_config = match client_tls_config(c) {
        Ok(cc) => cc,
        Err(e) => {
            // Nothing can be ordered without it; the gateway keeps serving.
            tracing::error!("acme: {e}; no certificate will be ordered");
            app.shutdown.cancelled().await;
            return;
        }
    };
    let captured = Arc::new(Mutex::new(None));
    let cache = StateCache {
        dir: PathBuf::from(&c.state_dir),
        captured: captured.clone(),
    };
    let contact: Vec<String> = match c.contact.as_str() {
        "" => Vec::new(),
        m if m.starts_with("mailto:") => vec![m.to_string()],
        m => vec![format!("mailto:{m}")],
    };
    let mut state: AcmeState<std::io::Error> =
        rustls_acme::AcmeConfig::new_with_client_config(&c.domains, client_config)
            .directory(c.directory())
            .contact(contact)
            .challenge_type(match c.challenge {
                AcmeChallenge::Http01 => UseChallenge::Http01,
                AcmeChallenge::TlsAlpn01 => UseChallenge::TlsAlpn01,
            })
            .cache(cache)
            .state();
    app.acme.set_resolver(state.resolver());

    let mut exporter = Exporter {
        app: app.clone(),
        dir: cert_dir,
        pending: None,
        retry_in: EXPORT_RETRY_FIRST,
        retry_at: None,
    };
    let mut failures_in_a_row = 0u32;
    loop {
        let retry_at = exporter.retry_at;
        tokio::select! {
            _ = app.shutdown.cancelled() => break,
            _ = sleep_until(retry_at), if retry_at.is_some() => exporter.export().await,
            event = state.next() => {
                let Some(event) = event else { break };
                match event {
                    Ok(EventOk::DeployedCachedCert) => {
                        tracing::info!("acme: using the cached certificate");
                        exporter.pending = take(&captured);
                        exporter.export().await;
                    }
                    Ok(EventOk::DeployedNewCert) => {
                        failures_in_a_row = 0;
                        tracing::info!(domains = ?app.config.acme.domains, "acme: new certificate issued");
                        record_order(metrics, true);
                    }
                    Ok(EventOk::CertCacheStore) => {
                        exporter.pending = take(&captured);
                        exporter.export().await;
                    }
                    Ok(EventOk::AccountCacheStore) => {
                        tracing::debug!("acme: account key cached");
                    }
                    Err(EventError::Order(e)) => {
                        failures_in_a_row += 1;
                        record_order(metrics, false);
                        tracing::error!(
                            directory = app.config.acme.directory(),
                            failures_in_a_row,
                            error = %e,
                            "acme: certificate order failed; retrying with backoff, the current certificate stays in use"
                        );
                    }
                    Err(EventError::CertCacheStore(e)) => {
                        tracing::error!(error = %e, "acme.state_dir: cannot cache the new certificate; a restart will order another");
                        exporter.pending = take(&captured);
                        exporter.export().await;
                    }
                    Err(EventError::AccountCacheStore(e)) => {
                        tracing::error!(error = %e, "acme.state_dir: cannot cache the account key; a restart will create another account");
                    }
                    Err(e @ (EventError::CertCacheLoad(_) | EventError::AccountCacheLoad(_))) => {
                        tracing::error!(error = %e, "acme.state_dir: cannot read the cache");
                    }
                    Err(e @ (EventError::CachedCertParse(_) | EventError::NewCertParse(_))) => {
                        take(&captured);
                        tracing::error!(error = %e, "acme: unusable certificate; ordering a new one");
                    }
                }
            }
        }
    }
    tracing::debug!("acme: stopped");
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn take(slot: &Mutex<Option<Vec<u8>>>) -> Option<Vec<u8>> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn record_order(metrics: &Metrics, ok: bool) {
    metrics.acme_last_order_success.store(ok as i64, Relaxed);
    metrics.acme_last_order_time.store(unix_now(), Relaxed);
    let counter = if ok {
        &metrics.acme_orders_ok
    } else {
        &metrics.acme_orders_failed
    };
    Metrics::add(counter, 1);
}

/// Sets the expiry gauge from the first certificate of a PEM chain.
fn record_expiry(metrics: &Metrics, chain_pem: &[u8]) {
    if let Some(not_after) = not_after(chain_pem) {
        metrics.acme_certificate_not_after.store(not_after, Relaxed);
    }
}

/// Unix time the first certificate in `chain_pem` expires.
pub fn not_after(chain_pem: &[u8]) -> Option<i64> {
    let der = CertificateDer::pem_slice_iter(chain_pem).next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Writes a certificate waiting for export into `acme.cert_dir`, runs the reload command when
/// the files changed, and schedules a retry with backoff when the directory is unwritable.
struct Exporter {
    app: Arc<App>,
    dir: PathBuf,
    /// rustls-acme's PEM (private key, then the chain) not yet written.
    pending: Option<Vec<u8>>,
    retry_in: Duration,
    retry_at: Option<tokio::time::Instant>,
}

impl Exporter {
    async fn export(&mut self) {
        self.retry_at = None;
        let Some(pem) = self.pending.take() else {
            return;
        };
        let Some((key, chain)) = split_key_and_chain(&pem) else {
            tracing::error!(
                "acme: the certificate from rustls-acme is not a key followed by a chain; not exported"
            );
            return;
        };
        let (key, chain) = (key.to_vec(), chain.to_vec());
        let dir = self.dir.clone();
        let written = tokio::task::spawn_blocking(move || write_pair(&dir, &key, &chain)).await;
        let metrics = &self.app.metrics;
        match written {
            Ok(Ok(changed)) => {
                self.retry_in = EXPORT_RETRY_FIRST;
                metrics.acme_placeholder.store(0, Relaxed);
                record_expiry(metrics, split_key_and_chain(&pem).map_or(&[][..], |p| p.1));
                if changed {
                    tracing::info!(cert_dir = %self.dir.display(), "acme: certificate written");
                    run_reload_command(&self.app).await;
                } else {
                    tracing::debug!("acme: exported certificate already up to date");
                }
            }
            Ok(Err(e)) => {
                Metrics::add(&metrics.acme_export_errors, 1);
                tracing::error!(
                    retry_in_s = self.retry_in.as_secs(),
                    "acme: {e}; nginx keeps its current certificate"
                );
                self.pending = Some(pem);
                self.retry_at = Some(tokio::time::Instant::now() + self.retry_in);
                self.retry_in = (self.retry_in * 2).min(EXPORT_RETRY_MAX);
            }
            Err(e) => tracing::error!(error = %e, "acme: export task failed"),
        }
    }
}

/// Runs `acme.reload_command` with `sh -c`, bounded by [`RELOAD_TIMEOUT`].
async fn run_reload_command(app: &App) {
    let cmd = &app.config.acme.reload_command;
    if cmd.is_empty() {
        return;
    }
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let failure = match tokio::time::timeout(RELOAD_TIMEOUT, child).await {
        Ok(Ok(out)) if out.status.success() => None,
        Ok(Ok(out)) => Some(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(Err(e)) => Some(format!("cannot start sh: {e}")),
        Err(_) => Some(format!("timed out after {} s", RELOAD_TIMEOUT.as_secs())),
    };
    match failure {
        None => tracing::info!(command = cmd, "acme: reload command ran"),
        Some(why) => {
            Metrics::add(&app.metrics.acme_reload_failures, 1);
            tracing::error!(command = cmd, "acme.reload_command failed: {why}");
        }
    }
}

/// Splits rustls-acme's certificate PEM: the private key block first, then the chain.
fn split_key_and_chain(pem: &[u8]) -> Option<(&[u8], &[u8])> {
    let text = std::str::from_utf8(pem).ok()?;
    if !text.trim_start().starts_with("-----BEGIN PRIVATE KEY-----") {
        return None;
    }
    let end = text.find("-----END PRIVATE KEY-----")? + "-----END PRIVATE KEY-----".len();
    let chain = text[end..].trim_start();
    if !chain.starts_with("-----BEGIN CERTIFICATE-----") {
        return None;
    }
    let key = &text[..end];
    Some((key.trim_start().as_bytes(), chain.as_bytes()))
}

/// Writes the pair unless both files already hold exactly these bytes: `privkey.pem` first,
/// `fullchain.pem` last (a watcher of `fullchain.pem` then sees a complete pair). Returns
/// whether anything was written.
fn write_pair(dir: &Path, key: &[u8], chain: &[u8]) -> Result<bool, Error> {
    let key = with_newline(key);
    let chain = with_newline(chain);
    let same = |name: &str, want: &[u8]| std::fs::read(dir.join(name)).is_ok_and(|b| b == want);
    if same(PRIVKEY_FILE, &key) && same(FULLCHAIN_FILE, &chain) {
        return Ok(false);
    }
    let err = |source| Error::CertDir {
        path: dir.to_path_buf(),
        source,
    };
    create_dir(dir, 0o755).map_err(err)?;
    write_atomic(dir, PRIVKEY_FILE, &key, 0o600).map_err(err)?;
    write_atomic(dir, FULLCHAIN_FILE, &chain, 0o644).map_err(err)?;
    Ok(true)
}

fn with_newline(b: &[u8]) -> Vec<u8> {
    let mut v = b.to_vec();
    if !v.ends_with(b"\n") {
        v.push(b'\n');
    }
    v
}

fn create_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
}

/// Writes `name` in `dir` atomically: a temporary file with `mode`, synced, then renamed over.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    // The umask may have narrowed the mode; say it exactly.
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes a self-signed placeholder pair when `dir` lacks either file, so that nginx can start
/// before the first certificate. Returns whether it wrote one.
pub async fn ensure_placeholder(dir: &Path, domains: &[String]) -> Result<bool, Error> {
    let dir = dir.to_path_buf();
    let domains = domains.to_vec();
    tokio::task::spawn_blocking(move || {
        if dir.join(FULLCHAIN_FILE).exists() && dir.join(PRIVKEY_FILE).exists() {
            return Ok(false);
        }
        let (key, cert) = placeholder(&domains)?;
        write_pair(&dir, key.as_bytes(), cert.as_bytes())
    })
    .await
    .unwrap_or(Ok(false))
}

/// A self-signed certificate for `domains`, valid for [`PLACEHOLDER_LIFETIME`]: (key, cert) PEM.
fn placeholder(domains: &[String]) -> Result<(String, String), rcgen::Error> {
    let mut params = rcgen::CertificateParams::new(domains.to_vec())?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "pushgate placeholder (no ACME certificate yet)",
    );
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + PLACEHOLDER_LIFETIME;
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((key.serialize_pem(), cert.pem()))
}

/// The TLS client configuration for talking to the ACME server: the public roots, plus the
/// certificates in `acme.root_ca_file` when set.
fn client_tls_config(c: &AcmeConfig) -> Result<Arc<ClientConfig>, Error> {
    crate::client_tls::client_config("acme.root_ca_file", &c.root_ca_file)
        .map_err(|e| Error::RootCa(e.to_string()))
}

/// The account key and issued certificates, one file each in `acme.state_dir` (mode 0600),
/// named by a hash of what they are for (contact or domains, and the directory URL), so a
/// changed domain list or CA orders anew. The last certificate loaded or stored is kept in
/// `captured` for the export.
struct StateCache {
    dir: PathBuf,
    captured: Arc<Mutex<Option<Vec<u8>>>>,
}

impl StateCache {
    fn file(&self, kind: &str, parts: &[String], directory_url: &str) -> PathBuf {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for p in parts {
            ctx.update(p.as_bytes());
            ctx.update(&[0]);
        }
        ctx.update(directory_url.as_bytes());
        let hex: String = ctx.finish().as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.dir.join(format!("{kind}-{hex}"))
    }

    async fn read(&self, path: PathBuf) -> std::io::Result<Option<Vec<u8>>> {
        let dir = self.dir.clone();
        let read = tokio::task::spawn_blocking(move || match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
        .map_err(std::io::Error::other)?;
        read.map_err(|e| state_dir_error(&dir, e))
    }

    async fn write(&self, path: PathBuf, bytes: Vec<u8>) -> std::io::Result<()> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            create_dir(&dir, 0o700)?;
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("cache");
            write_atomic(&dir, name, &bytes, 0o600)
        })
        .await
        .map_err(std::io::Error::other)?
        .map_err(|e| state_dir_error(&self.dir, e))
    }
}

fn state_dir_error(dir: &Path, e: std::io::Error) -> std::io::Error {
    let kind = e.kind();
    std::io::Error::new(
        kind,
        Error::StateDir {
            path: dir.to_path_buf(),
            source: e,
        },
    )
}

#[async_trait::async_trait]
impl rustls_acme::CertCache for StateCache {
    type EC = std::io::Error;

    async fn load_cert(
        &self,
        domains: &[String],
        directory_url: &str,
    ) -> Result<Option<Vec<u8>>, Self::EC> {
        let pem = self.read(self.file("cert", domains, directory_url)).await?;
        *self.captured.lock().unwrap_or_else(|e| e.into_inner()) = pem.clone();
        Ok(pem)
    }

    async fn store_cert(
        &self,
        domains: &[String],
        directory_url: &str,
        cert: &[u8],
    ) -> Result<(), Self::EC> {
        *self.captured.lock().unwrap_or_else(|e| e.into_inner()) = Some(cert.to_vec());
        self.write(self.file("cert", domains, directory_url), cert.to_vec())
            .await
    }
}

#[async_trait::async_trait]
impl rustls_acme::AccountCache for StateCache {
    type EA = std::io::Error;

    async fn load_account(
        &self,
        contact: &[String],
        directory_url: &str,
    ) -> Result<Option<Vec<u8>>, Self::EA> {
        self.read(self.file("account", contact, directory_url))
            .await
    }

    async fn store_account(
        &self,
        contact: &[String],
        directory_url: &str,
        account: &[u8],
    ) -> Result<(), Self::EA> {
        self.write(
            self.file("account", contact, directory_url),
            account.to_vec(),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pushgate-acme-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn splits_key_and_chain() {
        let pem = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n\n-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nCCCC\n-----END CERTIFICATE-----\n";
        let (key, chain) = split_key_and_chain(pem).unwrap();
        assert_eq!(
            key,
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"
        );
        assert!(chain.starts_with(b"-----BEGIN CERTIFICATE-----\nBBBB"));
        assert!(chain.ends_with(b"CCCC\n-----END CERTIFICATE-----\n"));
        assert!(split_key_and_chain(b"-----BEGIN CERTIFICATE-----\n").is_none());
        assert!(
            split_key_and_chain(b"-----BEGIN PRIVATE KEY-----\nA\n-----END PRIVATE KEY-----\n")
                .is_none()
        );
    }

    #[tokio::test]
    async fn placeholder_is_written_once_with_a_private_key_file() {
        let dir = temp_dir("placeholder");
        let domains = vec!["example.com".to_string()];
        assert!(ensure_placeholder(&dir, &domains).await.unwrap());
        let chain = std::fs::read(dir.join(FULLCHAIN_FILE)).unwrap();
        let key_mode = std::fs::metadata(dir.join(PRIVKEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let expires = not_after(&chain).unwrap();
        let left = expires - unix_now();
        assert!(
            (6 * 86400..=7 * 86400).contains(&left),
            "placeholder expires in {left} s"
        );
        // Present files are never replaced by a placeholder.
        assert!(!ensure_placeholder(&dir, &domains).await.unwrap());
        assert_eq!(std::fs::read(dir.join(FULLCHAIN_FILE)).unwrap(), chain);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_pair_reports_changes_and_leaves_no_temporary_files() {
        let dir = temp_dir("pair");
        assert!(write_pair(&dir, b"KEY", b"CHAIN").unwrap());
        assert!(!write_pair(&dir, b"KEY", b"CHAIN").unwrap());
        assert!(write_pair(&dir, b"KEY", b"CHAIN2").unwrap());
        assert_eq!(
            std::fs::read(dir.join(FULLCHAIN_FILE)).unwrap(),
            b"CHAIN2\n"
        );
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [FULLCHAIN_FILE, PRIVKEY_FILE]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unwritable_cert_dir_names_the_key() {
        // A regular file where the directory should be: fails even for root.
        let base = temp_dir("unwritable");
        std::fs::create_dir_all(&base).unwrap();
        let file = base.join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let e = write_pair(&file.join("tls"), b"K", b"C").unwrap_err();
        assert!(e.to_string().starts_with("acme.cert_dir: "), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn root_ca_file_problems_name_the_key() {
        let mut c = AcmeConfig {
            root_ca_file: "/nonexistent/ca.pem".into(),
            ..AcmeConfig::default()
        };
        let e = client_tls_config(&c).unwrap_err();
        assert!(
            e.to_string().starts_with("acme.root_ca_file: cannot read"),
            "{e}"
        );
        let dir = temp_dir("rootca");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), b"not pem").unwrap();
        c.root_ca_file = dir.join("ca.pem").display().to_string();
        let e = client_tls_config(&c).unwrap_err();
        assert!(e.to_string().contains("holds no usable PEM"), "{e}");
        let (_, cert) = placeholder(&["example.com".into()]).unwrap();
        std::fs::write(dir.join("ca.pem"), cert).unwrap();
        client_tls_config(&c).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
